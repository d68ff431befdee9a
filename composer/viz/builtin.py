"""The builtin renderer of :func:`composer.viz.draw`: matplotlib (Agg, no display, no graphviz).

Layout, in inches with y growing downwards: a header (title lines, a legend of kinds), then the
nodes in execution order as *slots* packed into columns read left to right, each top to bottom.
A slot is one node, or a parallel sub-layer: its branches side by side on one row and its
combine node on the row below. Data edges are arrows; an edge that leaves a column runs down,
across the gutter and in from above the next column. ``shares`` edges are dashed purple links,
and shared visits (and a tied head) are hatched and tagged with their owner.
"""
from __future__ import annotations

import textwrap

import networkx as nx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib import rc_context
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from composer.build.graph import execution_order
from composer.viz.labels import (columns, drawn_edges, human, kind_colour, kind_label,
                                 label_lines, node_notes)
from composer.viz.text import summary

W, G, BH, P, M = 2.5, 0.8, 0.46, 0.66, 0.35  # box width, gutter, box height, row pitch, margin
PAD = 0.06             # inner padding of a box (inches)
DPI = 120              # PNG resolution; text is measured at it (hinting changes widths)
INK, EDGE, SHARE = "#212121", "#455A64", "#8E24AA"


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
        """Width in inches of ``s`` at ``size`` points, as the PNG renders it."""
        t = self.ax.text(0, 0, s, fontsize=size, **kw)
        w = t.get_window_extent(self.renderer).width / self.px
        t.remove()
        return w

    def fit_text(self, x, y, s, width, size, **kw):
        """Text centred at (x, y), shrunk (then cut) to fit ``width`` inches (with a margin
        for SVG viewers whose fonts run wider)."""
        width *= 0.94
        while size > 5 and self.text_width(s, size, **kw) > width:
            size -= 0.25
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
        cols = columns(g)
        n_rows = max(sum(len(s) for s in col) for col in cols)
        body_w = len(cols) * W + (len(cols) - 1) * G
        width = max(body_w + 2 * M + 0.4, 7.5)
        left0 = (width - body_w) / 2
        links = [(u, v) for u, v, k in drawn_edges(g) if k == "shares"]
        col_of = {n: ci for ci, col in enumerate(cols) for s in col for r in s for n in r}
        buses = list(dict.fromkeys(u for u, v in links if col_of[u] != col_of[v]))
        head = _Header(g, T, title, width)
        top = head.height + 0.25 + 0.08 * len(buses)  # room for the buses of shares links
        c = _Canvas(width, top + n_rows * P + M)
        head.draw(c)
        box = {}  # node -> (x0, y0, w, h)
        for ci, col in enumerate(cols):
            for ri, row in enumerate(row for slot in col for row in slot):
                bw = (W - PAD * (len(row) - 1)) / len(row)
                for k, nid in enumerate(row):
                    box[nid] = (left0 + ci * (W + G) + k * (bw + PAD), top + ri * P, bw, BH)
                    _draw_box(c, g, nid, *box[nid])
        right = {n: left0 + col_of[n] * (W + G) + W for n in box}  # right edge of the column
        _data_edges(c, g, box, col_of, right, top)
        owners = list(dict.fromkeys(u for u, _ in links))
        for u, v in links:
            (ux, uy, uw, uh), (vx, vy, vw, vh) = box[u], box[v]
            k = owners.index(u)
            lane, ya, yb = right[u] + 0.1 + 0.06 * (k % 4), uy + uh / 2, vy + vh / 2
            if col_of[u] == col_of[v]:  # a bracket in the gutter right of the column
                pts = [(lane, yb), (vx + vw, yb)]
            else:  # up the gutter, along a bus above the columns, down left of the visit
                bus, entry = top - 0.3 - 0.08 * buses.index(u), vx - 0.2 - 0.05 * (k % 2)
                yb = vy + 0.35 * vh
                pts = [(lane, bus), (entry, bus), (entry, yb), (vx, yb)]
            c.arrow([(ux + uw, ya), (lane, ya)] + pts, ls="--", color=SHARE, lw=1.0)
        for fmt, path in paths.items():
            c.fig.savefig(path, format=fmt, dpi=DPI if fmt == "png" else 72,
                          metadata={"Date": None} if fmt == "svg" else None)


def _data_edges(c: _Canvas, g: nx.DiGraph, box: dict, col_of: dict, right: dict,
                top: float) -> None:
    """Arrows of the data path: straight within a column; down, across the gutter and in
    from above into the next column; a parallel sub-layer's residual dotted down its left."""
    gap = P - BH
    for u, v, kind in g.edges(data="kind"):
        (ux, uy, uw, uh), (vx, vy, vw, vh) = box[u], box[v]
        if kind == "residual":  # from the fork above the branches (or the column's entry)
            bx = vx - 0.14
            fork = [(vx + 0.14, uy + uh), (vx + 0.14, vy - P - gap / 2)] \
                if col_of[u] == col_of[v] else [(vx + 0.14, top - gap / 2 - 0.06)]
            yin = vy + 0.65 * vh  # below a shares link coming in from the left
            c.arrow(fork + [(bx, fork[-1][1]), (bx, yin), (vx, yin)], ls=":")
        elif kind == "data" and col_of[u] == col_of[v]:
            c.arrow([(ux + uw / 2, uy + uh), (vx + vw / 2, vy)])
        elif kind == "data":
            below, above, gx = uy + uh + gap / 2, top - gap / 2 - 0.06, right[u] + G / 2
            c.arrow([(ux + uw / 2, uy + uh), (ux + uw / 2, below), (gx, below), (gx, above),
                     (vx + vw / 2, above), (vx + vw / 2, vy)])


class _Header:
    """Title lines (totals, counting, pattern) and a legend of the kinds and marks in use."""

    def __init__(self, g: nx.DiGraph, T: int, title: str | None, width: float):
        probe = _Canvas(width, 1.0)
        char = probe.text_width("x" * 40, 9.5, family="monospace") / 40
        chars = int((width - 2 * M) / char)
        self.title, *rest = summary(g, T, title, width=chars - len("counting megatron, pattern "))
        self.text = "\n".join(textwrap.fill(line, chars) for line in rest)
        self.n_lines = self.text.count("\n") + 2
        kinds = dict.fromkeys(g.nodes[n].get("kind", "?") for n in execution_order(g))
        self.legend = [(k, "box", kind_colour(k)) for k in kinds]
        if any(a.get("shares") for _, a in g.nodes(data=True)):
            self.legend.append(("shared weights", "hatch", "#FFFFFF"))
        edge_kinds = {k for _, _, k in g.edges(data="kind")}
        self.legend += [(label, sym, col) for label, sym, col, k in
                        [("shares (owner → visit)", "--", SHARE, "shares"),
                         ("residual stream", ":", EDGE, "residual")] if k in edge_kinds]
        self.entry_w = [0.3 + probe.text_width(label, 8.5) + 0.2 for label, _, _ in self.legend]
        self.places, x, y = [], M, M + 0.24 * self.n_lines + 0.2
        for w in self.entry_w:
            if x + w > width - M and x > M:
                x, y = M, y + 0.3
            self.places.append((x, y))
            x += w
        self.height = y + 0.2

    def draw(self, c: _Canvas) -> None:
        c.ax.text(M, M, self.title, fontsize=11, weight="bold", va="top", ha="left", color=INK)
        c.ax.text(M, M + 0.3, self.text, fontsize=9.5, family="monospace", va="top",
                  ha="left", color=INK, linespacing=1.45)
        for (label, sym, colour), (x, y) in zip(self.legend, self.places):
            if sym in ("box", "hatch"):
                c.ax.add_patch(Rectangle((x, y - 0.08), 0.22, 0.16, facecolor=colour, lw=0.7,
                                         edgecolor=EDGE, hatch="////" if sym == "hatch" else None))
            else:
                c.ax.plot([x, x + 0.22], [y, y], ls=sym, color=colour, lw=1.2)
            c.ax.text(x + 0.3, y, label, fontsize=8.5, va="center", color=INK)


def _draw_box(c: _Canvas, g: nx.DiGraph, nid: str, x0, y0, bw, bh) -> None:
    """One node: a rounded box in its kind's colour, title on top, params and notes below
    (three short lines in a branch's narrower box); a shared visit is hatched with a dashed
    outline."""
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
    if bw < W:  # a branch: id, kind, then params (a bare number beside notes) and notes
        notes = node_notes(g, nid, picture=True)
        own = [] if shared else [human(a.get("params", 0)) + ("" if notes else " params")]
        lines = [(nid, 7.5, "bold"), (kind_label(a), 7.0, "normal"),
                 (" · ".join(own + notes), 6.5, "normal")]
        ys = (0.2, 0.5, 0.8)
    else:
        lines = [(first, 8.5, "bold"), (" · ".join(rest), 7.5, "normal")]
        ys = (0.3, 0.72)
    for (text, size, weight), fy in zip(lines, ys):
        c.fit_text(x0 + bw / 2, y0 + bh * fy, text, bw - 2 * PAD, size, weight=weight, **kw)
