"""The loss curve of a run: ``loss.png`` from the rows of ``metrics.jsonl``.

Text runs: one unit throughout, bits per byte (a cross-entropy in nats divided by ln 2), so the
train curve, the validation points and the unigram baseline read on the same axis. Task runs
(rows with ``val_acc``): the loss in nats per scored token, and the test accuracy on a second
axis with the chance level dashed.
"""
from __future__ import annotations

import math
from pathlib import Path


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot_losses(rows: list[dict], out: Path, title: str = "") -> Path:
    """Draw train loss (rows with ``loss``) and validation loss (rows with ``val_loss``)
    against ``step``: in bits per byte with the unigram baseline (a row with ``unigram_bpb``)
    as a dashed line for text; in nats with the accuracy (rows with ``val_acc``) on a right
    axis and chance (a row with ``chance_acc``) for a task. Values that are null, NaN or
    infinite (a diverged step) are left out, so the curve shows what is finite. Writes ``out``
    (PNG) and returns it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = any(_finite(r.get("val_acc")) or "chance_acc" in r for r in rows)
    scale = 1.0 if task else 1 / math.log(2)
    train = [(r["step"], r["loss"] * scale) for r in rows if _finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"] * scale) for r in rows if _finite(r.get("val_loss"))]
    unigram = [r["unigram_bpb"] for r in rows if _finite(r.get("unigram_bpb"))]
    acc = [(r["step"], 100 * r["val_acc"]) for r in rows if _finite(r.get("val_acc"))]
    chance = [100 * r["chance_acc"] for r in rows if _finite(r.get("chance_acc"))]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        lines = []
        if train:
            lines += ax.plot(*zip(*train), lw=1.2, label="train")
        if val:
            lines += ax.plot(*zip(*val), "o-", lw=1.5, ms=4,
                             label="test" if task else "validation")
        if unigram:
            lines.append(ax.axhline(unigram[-1], ls="--", color="gray", lw=1.2,
                                    label=f"unigram baseline ({unigram[-1]:.2f})"))
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats per scored token)" if task
                      else "cross-entropy (bits per byte)")
        if task:
            right = ax.twinx()
            if acc:
                lines += right.plot(*zip(*acc), "s-", color="tab:green", lw=1.5, ms=4,
                                    label="test accuracy")
            if chance:
                lines.append(right.axhline(chance[-1], ls=":", color="tab:green", lw=1.2,
                                           label=f"chance ({chance[-1]:.1f}%)"))
            right.set_ylabel("accuracy on scored tokens (%)")
            right.set_ylim(0, 100)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(handles=lines, loc="center right" if task else "best")
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)
    return Path(out)
