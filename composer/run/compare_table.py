"""The tables of ``hycomp compare``: cells formatted for reading, Markdown, CSV, the files.

:func:`write` puts ``compare.md`` / ``.csv`` / ``.json`` (the main table: the best run of each
configuration) and ``compare_all.md`` / ``.csv`` (every run) into the output folder; the rows
and columns come from :func:`composer.run.compare.compare`.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer.run.guards import json_safe

if TYPE_CHECKING:
    from composer.run.compare import Comparison


def si(x: float, unit: str = "") -> str:
    """Three significant digits in decimal units: 1234567 -> 1.23M, 4.5e9 FLOP -> 4.5 GFLOP."""
    units = (("", 1.0), ("K", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12))
    i = 0
    while i < len(units) - 1 and abs(x) >= units[i + 1][1]:
        i += 1
    text = f"{x / units[i][1]:.3g}"
    if abs(float(text)) >= 1000 and i < len(units) - 1:    # 999,950 rounds up to 1.00M
        i += 1
        text = f"{x / units[i][1]:.3g}"
    return f"{text} {units[i][0]}{unit}" if unit else f"{text}{units[i][0]}"


def duration(s: float) -> str:
    """Seconds for reading: 8.2 s, 3m 05s, 2h 07m."""
    if s < 60:
        return f"{s:.1f} s"
    m = int(round(s)) // 60
    return f"{m}m {int(round(s)) % 60:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"


def cell(key: str, v: Any) -> str:
    """A table cell: ``v`` formatted for reading (``-`` for no value)."""
    from composer.viz.labels import human_bytes
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if key == "schedule":
        return f"`{v if len(v) <= 40 else v[:37] + '...'}`"
    formats = {"params": si, "flops_per_token": lambda x: si(x, "FLOP"),
               "state_bytes": human_bytes, "attention_share": lambda x: f"{x:.1%}",
               "val_loss": lambda x: f"{x:.4f}", "best_val_loss": lambda x: f"{x:.4f}",
               "val_bpb": lambda x: f"{x:.3f}", "val_acc": lambda x: f"{x:.1%}",
               "best_val_acc": lambda x: f"{x:.1%}", "tokens_per_s": si, "wall_s": duration}
    if key in formats:
        return formats[key](v)
    if key.startswith("acc "):
        return f"{v:.1%}"
    if key.startswith("bpb "):
        return f"{v:.3f}"
    return str(v).replace("|", "\\|")


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table, numbers right-aligned."""
    text = {"label", "schedule", "status"}
    numeric = [k not in text and any(isinstance(r.get(k), (int, float)) for r in rows)
               for k, _ in columns]
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(k, r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def to_csv(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Raw values, one column per row key (and the run's folder)."""
    keys = [k for k, _ in columns] + ["name", "path"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for r in rows:
        w.writerow(["" if r.get(k) is None else r[k] for k in keys])
    return buf.getvalue()


def _document(cmp: "Comparison", rows, columns, title: str) -> str:
    at = cmp.settings["context"]
    where = f"T={at}" if at else "each run's data.seq_len"
    lines = [f"# {title}", "",
             f"Runs vary in: {', '.join(cmp.varies) or 'nothing recorded'}. Costs at "
             f"{where} tokens: forward FLOPs "
             "per token; state = recurrent states + KV caches per sequence (fp32); attn "
             "share = softmax-attention sub-layers / sequence-mixing sub-layers. Losses in "
             "nats per scored token.", "", markdown(rows, columns)]
    if cmp.notes:
        lines += ["", "Notes:", *[f"- {n.removeprefix('note: ')}" for n in cmp.notes]]
    return "\n".join(lines) + "\n"


def write(cmp: "Comparison", out: Path, extra: dict | None = None) -> list[Path]:
    """Write ``compare.md`` / ``.csv`` / ``.json`` (the main table; the JSON also holds the
    notes and ``settings`` plus ``extra``) and ``compare_all.md`` / ``.csv`` (every run) into
    ``out``; return the paths."""
    out = Path(out)
    n, shown = cmp.settings["runs"], len(cmp.rows)
    what = f"{n} runs" if shown == n else \
        f"{n} runs, the best {cmp.settings['best_over']} of each configuration ({shown} rows)"
    files = {
        "compare.md": _document(cmp, cmp.rows, cmp.columns, f"hycomp compare: {what}"),
        "compare.csv": to_csv(cmp.rows, cmp.columns),
        "compare.json": json.dumps(json_safe({"rows": cmp.rows, "notes": cmp.notes,
                                              "settings": {**cmp.settings, **(extra or {})}}),
                                   indent=1, allow_nan=False) + "\n",
        "compare_all.md": _document(cmp, cmp.all_rows, cmp.all_columns,
                                    f"hycomp compare: all {n} runs"),
        "compare_all.csv": to_csv(cmp.all_rows, cmp.all_columns)}
    paths = []
    for name, text in files.items():
        (out / name).write_text(text)
        paths.append(out / name)
    return paths
