"""What a run writes besides checkpoints: ``metrics.jsonl`` rows, ``summary.json``, ``loss.png``.

Every file is strict JSON: a NaN or infinite value (a diverged step) is written ``null``
(:func:`composer.run.guards.json_safe`), and readers take ``null`` as "no value" (the plot
leaves it out).
"""
from __future__ import annotations

import json
from pathlib import Path

from composer.run.checkpoint import write_text_atomic
from composer.run.guards import json_safe
from composer.run.plots import plot_losses


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (none when it does not exist)."""
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def metrics_line(row: dict) -> str:
    """One strict-JSON metrics line: NaN and infinities become null."""
    return json.dumps(json_safe(row), allow_nan=False) + "\n"


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(metrics_line(row))


def write_records(run_dir: Path, metrics: Path, summary: dict, title: str) -> dict:
    """Draw ``loss.png`` from ``metrics`` (what is finite) and write ``summary.json``; return
    the summary as written."""
    plot_losses(read_metrics(metrics), run_dir / "loss.png", title=title)
    summary = json_safe(summary)
    write_text_atomic(run_dir / "summary.json",
                      json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return summary
