"""The pictures of ``hycomp compare``, from a :class:`~composer.run.compare.Comparison`.

* ``loss.png``: the validation loss of every run against step, its train loss faint in the
  same colour, in bits per scored token (loss / ln 2); with task runs a second panel of
  validation accuracy against step.
* ``pareto.png``: the score of each row of the main table (final accuracy of task runs; for
  text runs bits per byte, lower is better) against its state bytes per sequence at the
  context (log axis), points labelled; the Pareto front, the best score for at most that
  state (:func:`pareto_front`), as a step line through its highlighted
  points. Runs on different data settings (a swept ``data.num_pairs``, another task) are not
  comparable: each such group (:func:`data_groups`) has its own colour and its own front.
* ``attention_share.png``: the same scores against the attention share, coloured by group.

Titles name what the runs vary. A run without a value that a picture needs (null, NaN, a
failed run) is left out of that picture, with a note saying so.
"""
from __future__ import annotations

import math
from pathlib import Path

from composer.run.compare import Comparison, RunRecord
from composer.run.guards import finite

BITS_PER_NAT = 1 / math.log(2)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colours(n: int) -> list:
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    return [cmap(i if n <= 20 else i / max(1, n - 1)) for i in range(n)]


def _varies(cmp: Comparison) -> str:
    keys = [cmp.short[k] for k in cmp.varies]
    return f"runs varying {', '.join(keys)}" if keys else "runs of one configuration"


def _series(rows: list[dict], key: str, scale: float = 1.0) -> list[tuple[float, float]]:
    return [(r["step"], r[key] * scale) for r in rows
            if isinstance(r.get(key), (int, float)) and finite(r[key])
            and isinstance(r.get("step"), (int, float))]


def plot_curves(cmp: Comparison, records: list[RunRecord], out: Path) -> tuple[Path, list[str]]:
    """``loss.png`` (see the module docstring) over every run; returns (path, notes)."""
    plt = _plt()
    labels = {r["path"]: r["label"] for r in cmp.all_rows}
    tasks = any(r.task != "text" for r in records)
    notes = []
    fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(13 if tasks else 8, 4.8), dpi=110,
                             squeeze=False)
    loss_ax, acc_ax = axes[0][0], axes[0][-1] if tasks else None
    try:
        for rec, colour in zip(records, _colours(len(records))):
            label = labels.get(str(rec.path), rec.name)
            val = _series(rec.metrics, "val_loss", BITS_PER_NAT)
            train = _series(rec.metrics, "loss", BITS_PER_NAT)
            if train:
                loss_ax.plot(*zip(*train), color=colour, lw=0.8, alpha=0.3)
            if val:
                loss_ax.plot(*zip(*val), "o-", color=colour, lw=1.5, ms=3, label=label)
            else:
                notes.append(f"note: loss.png: no validation loss of {label} (no finite value)")
            acc = _series(rec.metrics, "val_acc")
            if acc_ax is not None and acc:
                acc_ax.plot(*zip(*acc), "o-", color=colour, lw=1.5, ms=3, label=label)
            elif acc_ax is not None and rec.task != "text":
                notes.append(f"note: loss.png: no validation accuracy of {label}")
        loss_ax.set(xlabel="step", ylabel="validation loss (bits per scored token)",
                    title=f"Validation loss (train faint), {_varies(cmp)}")
        if acc_ax is not None:
            from matplotlib.ticker import PercentFormatter
            acc_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            acc_ax.set(xlabel="step", ylabel="validation accuracy",
                       title=f"Validation accuracy, {_varies(cmp)}")
        for ax in axes[0]:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7 if len(records) > 6 else 9)
        fig.tight_layout()
        fig.savefig(out / "loss.png")
    finally:
        plt.close(fig)
    return out / "loss.png", notes


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points ``(cost, score)`` on the Pareto front, by cost: a point is on it
    unless another has a cost no higher and a score no worse, one of the two strictly (equal
    points are on it together)."""
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front: list[int] = []
    best, best_x = -math.inf, None
    for i in order:
        x, y = points[i][0], sign * points[i][1]
        if y > best:
            front.append(i)
            best, best_x = y, x
        elif y == best and x == best_x:
            front.append(i)
    return front


def score(cmp: Comparison) -> tuple[str, str, bool]:
    """``(row key, axis label, higher is better)`` of the score the scatter plots show: the
    final accuracy when the table has task runs, else bits per byte."""
    if any(r["task"] != "text" for r in cmp.rows):
        return "val_acc", "final validation accuracy", True
    return "val_bpb", "validation bits per byte (lower is better)", False


def _points(cmp: Comparison, x_key: str, picture: str, positive: bool = False):
    """Rows with a finite x and score (``positive``: x > 0, for a log axis), and notes on the
    rows left out."""
    y_key, _, _ = score(cmp)
    keep, notes = [], []
    for r in cmp.rows:
        x, y = r.get(x_key), r.get(y_key)
        if not (finite(x) and finite(y)) or (positive and x <= 0):
            why = (f"no {y_key}" if not finite(y) else f"no {x_key}" if not finite(x)
                   else f"{x_key} is {x}")
            notes.append(f"note: {picture}: left out {r['label']} ({why}; status "
                         f"{r['status']})")
        else:
            keep.append(r)
    return keep, notes


def data_groups(cmp: Comparison, rows: list[dict]) -> list[tuple[str, list[int]]]:
    """Rows split by the data settings that vary (``data.*`` keys and the task): accuracy on
    one task setting is not comparable with another's, so each group gets its own colour and
    Pareto front. ``[(group name, row indices)]`` in first-seen order; one unnamed group when
    the data is the same in all."""
    keys = [k for k in cmp.varies if k.startswith("data.") or k == "data"]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.get("task"), *(r.get(k) for k in keys)), []).append(i)
    if len(groups) == 1:
        return [("", next(iter(groups.values())))]
    tasks = len({g[0] for g in groups}) > 1
    return [(", ".join([*([str(g[0])] if tasks else []),
                        *(f"{cmp.short.get(k, k)}={v}" for k, v in zip(keys, g[1:]))]), idx)
            for g, idx in groups.items()]


def _point_labels(cmp: Comparison, row: dict) -> str:
    """A run's label without the data settings its colour already tells."""
    data = {cmp.short.get(k, k) for k in cmp.varies if k.startswith("data.") or k == "data"}
    parts = [p for p in row["label"].split(", ") if p.split("=", 1)[0] not in data]
    return ", ".join(parts) or row["label"]


def _scatter_setup(cmp: Comparison, ax, rows: list[dict], xs: list[float], ys: list[float]):
    _, y_label, higher = score(cmp)
    ax.set_ylabel(y_label)
    if higher:
        from matplotlib.ticker import PercentFormatter
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    at: dict[tuple, list[str]] = {}            # runs at one point share one annotation
    for r, x, y in zip(rows, xs, ys):
        at.setdefault((x, y), []).append(_point_labels(cmp, r))
    for (x, y), labels in at.items():
        ax.annotate("\n".join(labels), (x, y), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    if not rows:
        ax.text(0.5, 0.5, "no run has both values", ha="center", va="center",
                transform=ax.transAxes)
    ax.grid(alpha=0.3, which="both")


def _save_scatter(cmp: Comparison, fig, ax, rows, xs, ys, path: Path) -> Path:
    """Labels, axes and grid of a scatter plot (:func:`_scatter_setup`), then the PNG."""
    _scatter_setup(cmp, ax, rows, xs, ys)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _context(cmp: Comparison) -> str:
    ts = {r.get("context") for r in cmp.rows if r.get("context") is not None}
    return f"T={ts.pop()}" if len(ts) == 1 else "each run's T"


def _best_note(cmp: Comparison) -> str:
    over = cmp.settings.get("best_over")
    return f" (best {cmp.short.get(over, over)} of each)" if over else ""


def plot_pareto(cmp: Comparison, out: Path) -> tuple[Path, list[str]]:
    """``pareto.png`` (see the module docstring); returns (path, notes)."""
    plt = _plt()
    rows, notes = _points(cmp, "state_bytes", "pareto.png", positive=True)
    y_key, _, higher = score(cmp)
    xs, ys = [r["state_bytes"] for r in rows], [r[y_key] for r in rows]
    groups = data_groups(cmp, rows)
    colours = _colours(len(groups))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    try:
        for (name, idx), colour in zip(groups, colours):
            gx, gy = [xs[i] for i in idx], [ys[i] for i in idx]
            tag = f" ({name})" if name else ""
            ax.scatter(gx, gy, s=28, color=colour, alpha=0.6, zorder=2, label=f"run{tag}")
            front = pareto_front(list(zip(gx, gy)), higher_is_better=higher)
            if front:
                fx, fy = [gx[i] for i in front], [gy[i] for i in front]
                ax.step(fx + [max(xs)], fy + [fy[-1]], where="post", color=colour, lw=1.5,
                        zorder=1, label=f"Pareto front{tag}")
                ax.scatter(fx, fy, s=70, color=colour, edgecolor="black", zorder=3)
        if rows:
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
        from composer.viz.labels import human_bytes
        ax.xaxis.set_major_locator(LogLocator(base=2))    # 16 KiB, 32 KiB, ...: round sizes
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_bytes(x)))
        ax.xaxis.set_minor_formatter(NullFormatter())   # minor labels overlap on narrow ranges
        ax.set_xlabel(f"state per sequence at {_context(cmp)} (fp32; log scale)")
        ax.set_title(f"Quality against state{_best_note(cmp)}, {_varies(cmp)}", fontsize=10)
        return _save_scatter(cmp, fig, ax, rows, xs, ys, out / "pareto.png"), notes
    finally:
        plt.close(fig)


def plot_attention_share(cmp: Comparison, out: Path) -> tuple[Path, list[str]]:
    """``attention_share.png`` (see the module docstring); returns (path, notes)."""
    plt = _plt()
    rows, notes = _points(cmp, "attention_share", "attention_share.png")
    y_key, _, _ = score(cmp)
    xs, ys = [r["attention_share"] for r in rows], [r[y_key] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    try:
        from matplotlib.ticker import PercentFormatter
        groups = data_groups(cmp, rows)
        for (name, idx), colour in zip(groups, _colours(len(groups))):
            ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], s=40, color=colour,
                       zorder=2, label=name or None)
        if len(groups) > 1:
            ax.legend(fontsize=8)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("attention share (softmax-attention sub-layers / sequence mixers)")
        ax.set_title(f"Quality against attention share{_best_note(cmp)}, {_varies(cmp)}",
                     fontsize=10)
        return _save_scatter(cmp, fig, ax, rows, xs, ys, out / "attention_share.png"), notes
    finally:
        plt.close(fig)


def plot_all(cmp: Comparison, records: list[RunRecord], out) -> tuple[list[Path], list[str]]:
    """Write ``loss.png``, ``pareto.png`` and ``attention_share.png`` into ``out``; return
    their paths and the notes on what was left out."""
    out = Path(out)
    paths, notes = [], []
    for path, more in (plot_curves(cmp, records, out), plot_pareto(cmp, out),
                       plot_attention_share(cmp, out)):
        paths.append(path)
        notes += more
    return paths, notes
