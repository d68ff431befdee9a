"""The loss curve of a run: ``loss.png`` from the rows of ``metrics.jsonl``.

One unit throughout: bits per byte (a cross-entropy in nats divided by ln 2), so the train
curve, the validation points and the unigram baseline read on the same axis.
"""
from __future__ import annotations

import math
from pathlib import Path


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot_losses(rows: list[dict], out: Path, title: str = "") -> Path:
    """Draw train loss (rows with ``loss``) and validation loss (rows with ``val_loss``) in bits
    per byte against ``step``, and the unigram baseline (a row with ``unigram_bpb``) as a
    dashed horizontal line. Values that are null, NaN or infinite (a diverged step) are left
    out, so the curve shows what is finite. Writes ``out`` (PNG) and returns it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    to_bits = 1 / math.log(2)
    train = [(r["step"], r["loss"] * to_bits) for r in rows if _finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"] * to_bits) for r in rows if _finite(r.get("val_loss"))]
    unigram = [r["unigram_bpb"] for r in rows if _finite(r.get("unigram_bpb"))]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        if train:
            ax.plot(*zip(*train), lw=1.2, label="train")
        if val:
            ax.plot(*zip(*val), "o-", lw=1.5, ms=4, label="validation")
        if unigram:
            ax.axhline(unigram[-1], ls="--", color="gray", lw=1.2,
                       label=f"unigram baseline ({unigram[-1]:.2f})")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (bits per byte)")
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        if train or val or unigram:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)
    return Path(out)
