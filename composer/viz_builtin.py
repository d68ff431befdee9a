"""The builtin renderer of :func:`composer.viz.draw`: matplotlib (Agg, no display, no graphviz).

Layout, in inches with y growing downwards: a header (title lines, a legend of kinds), then the
nodes in execution order as *slots* packed into columns read left to right, each top to bottom.
A slot is one node, or a parallel sub-layer: its branches side by side on one row and its
combine node on the row below. Data edges are arrows; an edge that leaves a column runs down,
across the gutter and in from above the next column. ``shares`` edges are dashed purple links,
and shared visits (and a tied head) are hatched and tagged with their owner.
"""
from __future__ import annotations

import math
import textwrap

import networkx as nx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle
from matplotlib import rc_context

from composer.graph import execution_order
from composer.viz import kind_colour, kind_label, label_lines, summary

W, G, BH, P, M = 2.5, 0.8, 0.46, 0.66, 0.35  # box width, gutter, box height, row pitch, margin
MAX_ROWS = 16          # rows per column before a new column starts (more for huge models)
PAD = 0.06             # inner padding of a box (inches)
DPI = 120              # PNG resolution; text is measured at it (hinting changes widths)
INK, EDGE, SHARE = "#212121", "#455A64", "#8E24AA"


def _slots(g: nx.DiGraph) -> list[list[list[str]]]:
    """Execution order grouped into slots; a slot is a list of rows, a row a list of nodes."""
    slots, branches = [], []
    for nid in execution_order(g):
        op = g.nodes[nid].get("op")
        if op == "branch":
            branches.append(nid)
        elif op == "combine":
            slots.append([branches, [nid]])
            branches = []
        else:
            slots.append([[nid]])
    return slots


def _columns(slots) -> list[list]:
    """Pack slots into balanced columns of at most about :data:`MAX_ROWS` rows."""
    total = sum(len(s) for s in slots)
    rows = max(MAX_ROWS, math.ceil(math.sqrt(total * (W + G) / (1.5 * P))))  # about 3:2
    target = math.ceil(total / math.ceil(total / rows))
    cols, used = [[]], 0
    for s in slots:
        if cols[-1] and used + len(s) > target:
            cols.append([])
            used = 0
        cols[-1].append(s)
        used += len(s)
    return cols


class _Canvas:
    """A figure whose single axes measures inches from the top-left corner."""

    def __init__(self, width: float, height: float):
        self.fig = Figure(figsize=(width, height), dpi=DPI)  # measure text as the PNG shows it
        FigureCanvasAgg(self.fig)
        self.ax = self.fig.add_axes((0, 0, 1, 1))
        self.ax.set_xlim(0, width)
        self.ax.set_ylim(height, 0)
        self.ax.axis("off")
        self.renderer = self.fig.canvas.get_renderer()
        self.px = self.fig.dpi  # pixels per inch when measuring text

    def text_width(self, s: str, size: float, **kw) -> float:
        t = self.ax.text(0, 0, s, fontsize=size, **kw)
        w = t.get_window_extent(self.renderer).width / self.px
        t.remove()
        return w

    def fit_text(self, x, y, s, width, size, **kw):
        """Text centred at (x, y), shrunk (then cut) to fit ``width`` inches (with a margin
        for SVG viewers whose fonts run wider)."""
        width *= 0.94
        w = self.text_width(s, size, **kw)
        if w > width:
            size = max(4.5, size * width / w)
            while len(s) > 3 and self.text_width(s, size, **kw) > width:
                s = s[:-2] + "…"
        self.ax.text(x, y, s, fontsize=size, ha="center", va="center", color=INK, zorder=4,
                     **kw)

    def arrow(self, points, style="-|>", ls="-", color=EDGE, lw=0.9, z=1):
        """A polyline through ``points`` with an arrow head on its last segment."""
        xs, ys = zip(*points)
        if len(points) > 2:
            self.ax.plot(xs[:-1], ys[:-1], ls=ls, color=color, lw=lw, zorder=z,
                         solid_capstyle="butt")
        self.ax.add_patch(FancyArrowPatch(points[-2], points[-1], arrowstyle=style,
                                          mutation_scale=8, lw=lw, ls=ls, color=color,
                                          shrinkA=0, shrinkB=0, zorder=z))


def render(g: nx.DiGraph, T: int, paths: dict, title: str | None = None) -> None:
    """Draw ``g`` and save it to each of ``paths`` (``{"svg": Path, "png": Path}``)."""
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "hycomp"}):
        _render(g, T, paths, title)


def _render(g, T, paths, title):
    cols = _columns(_slots(g))
    n_rows = max(sum(len(s) for s in c) for c in cols)
    body_w = len(cols) * W + (len(cols) - 1) * G
    width = max(body_w + 2 * M + 0.4, 7.5)
    chars = int((width - 2 * M) / 0.078)  # 9 pt monospace, about 0.075 in per character
    lines = [textwrap.fill(summary(g, T, title, width=chars)[0], int(chars * 0.95))]
    lines += summary(g, T, title, width=chars)[1:]
    head_lines = "\n".join(lines).count("\n") + 1
    kinds = list(dict.fromkeys(g.nodes[n].get("kind", "?") for n in execution_order(g)))
    legend = [(k, "box", kind_colour(k)) for k in kinds]
    if any(a.get("shares") for _, a in g.nodes(data=True)):
        legend.append(("shared weights", "hatch", "#FFFFFF"))
    edge_kinds = {k for _, _, k in g.edges(data="kind")}
    legend += [(label, sym, col) for label, sym, col, k in
               [("shares (owner → visit)", "--", SHARE, "shares"),
                ("residual stream", ":", EDGE, "residual")] if k in edge_kinds]
    c = _Canvas(width, 1.0)  # measuring canvas; the real one is sized after the legend
    entry_w = [0.3 + c.text_width(label, 8.5) + 0.2 for label, _, _ in legend]
    leg_rows, x = 1, 0.0
    for w in entry_w:
        if x + w > width - 2 * M:
            leg_rows, x = leg_rows + 1, 0.0
        x += w
    top = M + 0.24 * head_lines + 0.1 + 0.3 * leg_rows + 0.25
    height = top + n_rows * P + M
    c = _Canvas(width, height)
    ax = c.ax

    # header: title, then the legend
    ax.text(M, M, "\n".join(lines), fontsize=9.5, family="monospace", va="top", ha="left",
            color=INK, linespacing=1.45)
    x, y = M, M + 0.24 * head_lines + 0.2
    for (label, sym, colour), w in zip(legend, entry_w):
        if x + w > width - M:
            x, y = M, y + 0.3
        if sym in ("box", "hatch"):
            ax.add_patch(Rectangle((x, y - 0.08), 0.22, 0.16, facecolor=colour, edgecolor=EDGE,
                                   lw=0.7, hatch="////" if sym == "hatch" else None))
        else:
            ax.plot([x, x + 0.22], [y, y], ls=sym, color=colour, lw=1.2)
        ax.text(x + 0.3, y, label, fontsize=8.5, va="center", color=INK)
        x += w

    # boxes
    left0 = (width - body_w) / 2
    box, where = {}, {}  # node -> (x0, y0, w, h); node -> column
    for ci, col in enumerate(cols):
        x0, y0 = left0 + ci * (W + G), top
        for slot in col:
            for row in slot:
                bw = (W - PAD * (len(row) - 1)) / len(row)
                for k, nid in enumerate(row):
                    box[nid] = (x0 + k * (bw + PAD), y0, bw, BH)
                    where[nid] = ci
                y0 += P
    for nid, (x0, y0, bw, bh) in box.items():
        _draw_box(c, g, nid, x0, y0, bw, bh)

    # edges
    share_k: dict[int, int] = {}
    for u, v, kind in g.edges(data="kind"):
        ux, uy, uw, uh = box[u]
        vx, vy, vw, vh = box[v]
        if kind == "shares":
            _share_link(c, box[u], box[v], where[u] == where[v], share_k, where[u])
        elif kind == "residual":  # dotted, down the left side of the branches
            y1, bx = vy - P - (P - BH) / 2, vx - 0.14
            c.arrow([(vx + 0.14, y1 - (P - BH) / 2), (vx + 0.14, y1), (bx, y1),
                     (bx, vy + vh / 2), (vx, vy + vh / 2)], ls=":", lw=0.9)
        elif where[u] == where[v]:
            c.arrow([(ux + uw / 2, uy + uh), (vx + vw / 2, vy)])
        else:  # down, across the gutter, in from above the next column
            below, above = uy + uh + (P - BH) / 2, top - (P - BH) / 2 - 0.06
            gx = left0 + where[u] * (W + G) + W + G / 2
            c.arrow([(ux + uw / 2, uy + uh), (ux + uw / 2, below), (gx, below), (gx, above),
                     (vx + vw / 2, above), (vx + vw / 2, vy)])
    for fmt, path in paths.items():
        c.fig.savefig(path, format=fmt, dpi=DPI if fmt == "png" else 72,
                      metadata={"Date": None} if fmt == "svg" else None)


def _draw_box(c: _Canvas, g: nx.DiGraph, nid: str, x0, y0, bw, bh) -> None:
    """One node: a rounded box in its kind's colour, title on top, params and notes below
    (three short lines in a narrow box); a shared visit is hatched with a dashed outline."""
    a = g.nodes[nid]
    colour = kind_colour(a.get("kind", "?"))
    shared = a.get("shares") is not None
    c.ax.add_patch(FancyBboxPatch((x0, y0), bw, bh, boxstyle="round,pad=0,rounding_size=0.06",
                                  facecolor=colour, edgecolor=EDGE, lw=0.9,
                                  ls="--" if shared else "-", zorder=2))
    if shared:
        c.ax.add_patch(FancyBboxPatch((x0, y0), bw, bh,
                                      boxstyle="round,pad=0,rounding_size=0.06", fill=False,
                                      hatch="////", edgecolor="#FFFFFF", lw=0, zorder=3))
    kw = {"bbox": {"facecolor": colour, "edgecolor": "none", "pad": 1.0}} if shared else {}
    first, *rest = label_lines(g, nid)
    if bw < 1.0:  # a branch among three or more: id, kind, params on lines of their own
        lines = [(nid, 7.5, "bold"), (kind_label(a), 7.0, "normal"), (rest[0], 6.5, "normal")]
        ys = (0.2, 0.5, 0.8)
    else:
        lines = [(first, 8.5, "bold"), (" · ".join(rest), 7.5, "normal")]
        ys = (0.3, 0.72)
    for (text, size, weight), fy in zip(lines, ys):
        c.fit_text(x0 + bw / 2, y0 + bh * fy, text, bw - 2 * PAD, size, weight=weight, **kw)


def _share_link(c: _Canvas, ub, vb, same_column: bool, used: dict, col: int) -> None:
    """A dashed link from a shared module's owner to a later visit: a bracket in the gutter
    right of the column, or a curve between columns (drawn under the boxes)."""
    (ux, uy, uw, uh), (vx, vy, vw, vh) = ub, vb
    if same_column:
        k = used[col] = used.get(col, -1) + 1
        arm = 0.1 + 0.05 * (k % 5)
        right = max(ux + uw, vx + vw)
        pts = [(ux + uw, uy + uh / 2), (right + arm, uy + uh / 2), (right + arm, vy + vh / 2),
               (vx + vw, vy + vh / 2)]
        c.arrow(pts, ls="--", color=SHARE, lw=1.0, z=1)
    else:
        c.ax.add_patch(FancyArrowPatch((ux + uw, uy + uh / 2), (vx, vy + vh / 2),
                                       connectionstyle="arc3,rad=-0.15", arrowstyle="-|>",
                                       mutation_scale=8, ls="--", lw=1.0, color=SHARE,
                                       alpha=0.8, shrinkA=0, shrinkB=0, zorder=1))
