"""What every picture of the layer graph shares: colours, numbers, labels and the layout.

Every picture draws every node, so the picture is the model that runs: a later visit of a
shared module is its own node (hatched / dashed, with a dashed ``shares`` link from the owner),
and a parallel sub-layer shows its branches side by side above its combine node. Deep models
are laid out in columns of sub-layers (:func:`columns`).
"""
from __future__ import annotations

import colorsys
import hashlib
import math

import networkx as nx

from composer.build.graph import data_inputs, execution_order

# Fill colour per block kind; other kinds get a stable colour from a hash of their name.
PALETTE = {
    "embed": "#B0BEC5", "norm": "#CFD8DC", "head": "#90A4AE",
    "attention": "#EF9A9A", "mamba2": "#90CAF9", "mlp": "#A5D6A7", "moe": "#FFE082",
    "gated_deltanet": "#CE93D8", "parallel": "#FFCC80", "linear_attention": "#F48FB1",
    "gla": "#B39DDB", "rwkv7": "#80CBC4", "retnet": "#80DEEA", "mamba": "#81D4FA",
    "deltanet": "#E1BEE7", "block_attention": "#FFAB91", "sparse_attention": "#F8BBD0",
    "routed": "#DCE775", "rglru": "#B2DFDB",
}


def kind_colour(kind: str) -> str:
    """Fill colour of a block kind: :data:`PALETTE`, else a light colour hashed from the name."""
    if kind in PALETTE:
        return PALETTE[kind]
    hue = int(hashlib.md5(kind.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    r, g, b = colorsys.hls_to_rgb(hue, 0.78, 0.55)
    return "#{:02X}{:02X}{:02X}".format(round(r * 255), round(g * 255), round(b * 255))

def human(x: float) -> str:
    """1234 -> 1.2K, 34_500 -> 34.5K, 2.1e9 -> 2.1G (decimal units)."""
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"

def human_bytes(n: float) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 3.0 MiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"

def kind_label(a: dict) -> str:
    """``name (kind)`` when the recipe's block name differs from its kind, else the kind."""
    kind, name = a.get("kind", a.get("op", "?")), a.get("name")
    return kind if not name or name == kind else f"{name} ({kind})"

def _shares_note(a: dict) -> str:
    owner = a.get("shares")
    if owner is None:
        return ""
    return f"tied to {owner}" if a.get("op") == "head" else f"shared with {owner}"

def node_title(g: nx.DiGraph, nid: str) -> str:
    """``L4  local (attention)``; ``norm (rmsnorm)`` and ``embed`` for the end nodes."""
    a = g.nodes[nid]
    if nid == a.get("kind"):
        return nid if a.get("name") in (None, nid) else f"{nid} ({a['name']})"
    return f"{nid}  {kind_label(a)}"

def node_notes(g: nx.DiGraph, nid: str, picture: bool = False) -> list[str]:
    """Short notes on a node: weight sharing, attention window, parallel branch / combine.
    ``picture``: leave out "branch of Lx", which a drawing shows by placement."""
    a = g.nodes[nid]
    notes = [n for n in [_shares_note(a)] if n]
    spec = a.get("spec")
    if getattr(spec, "window", None) is not None:
        notes.append(f"window={spec.window}")
    if a.get("op") == "branch" and not picture:
        notes.append(f"branch of L{a['index']}")
    elif a.get("op") == "combine":
        n_br = len(getattr(spec, "branches", []) or [])
        notes.append(f"{getattr(spec, 'combine', 'combine')} of {n_br} branches")
    return notes

def label_lines(g: nx.DiGraph, nid: str) -> list[str]:
    """Lines of a node's label in a picture: title, parameters (unless it shares another
    node's), notes."""
    a = g.nodes[nid]
    own = [] if a.get("shares") else [f"{human(a.get('params', 0))} params"]
    return [node_title(g, nid)] + own + node_notes(g, nid, picture=True)

def parallel_groups(g: nx.DiGraph) -> dict[str, list[str]]:
    """Combine node -> its branch nodes, in slot order."""
    return {nid: [p for p in data_inputs(g, nid) if g.nodes[p].get("op") == "branch"]
            for nid, op in g.nodes(data="op") if op == "combine"}

def columns(g: nx.DiGraph, max_rows: int = 16) -> list[list[list[list[str]]]]:
    """The nodes in execution order as balanced columns of slots, read left to right.

    A slot is a list of rows, a row a list of node ids: one node, or a parallel sub-layer's
    branches on one row and its combine node on the next. A column holds at most about
    ``max_rows`` rows (more for very deep models, to keep the picture near 3:2 landscape).
    """
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
    total = sum(len(s) for s in slots)
    n_cols = math.ceil(total / max(max_rows, math.ceil(math.sqrt(total * 3.3))))
    target = math.ceil(total / n_cols)
    while True:  # a two-row slot may not fit a column's end: lengthen the columns until it does
        cols, used = [[]], 0
        for s in slots:
            if cols[-1] and used + len(s) > target:
                cols.append([])
                used = 0
            cols[-1].append(s)
            used += len(s)
        if len(cols) <= n_cols:
            return cols
        target += 1

def drawn_edges(g: nx.DiGraph) -> list[tuple[str, str, str]]:
    """Edges ``(u, v, kind)`` a picture draws: all but the ``shares`` edges between branches
    (a shared parallel sub-layer is linked at its combine node; each branch visit still
    names its owner)."""
    return [(u, v, k) for u, v, k in g.edges(data="kind")
            if not (k == "shares" and g.nodes[u].get("op") == "branch")]
