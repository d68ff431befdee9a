"""Pictures of the layer graph: a terminal table, DOT and Mermaid text, SVG/PNG drawings.

Everything reads the layer graph of :mod:`composer.build.graph` and draws every node, so the picture
is the model that runs: a later visit of a shared module is its own node (hatched / dashed, with
a dashed ``shares`` link from the owner), and a parallel sub-layer shows its branches side by
side above its combine node.

:func:`draw` renders SVG and PNG with graphviz ``dot`` when it is installed (``engine="auto"``)
and otherwise with the builtin matplotlib renderer (:mod:`composer.viz.builtin`), which needs no
binary and stays readable for deep models by laying the sub-layers out in columns.
"""
from __future__ import annotations

import colorsys
import hashlib
import math
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import networkx as nx

from composer.core.errors import HycompError
from composer.build.graph import data_inputs, execution_order, totals

FORMATS = ("svg", "png", "mmd", "dot")
ENGINES = ("auto", "dot", "builtin")

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


# --------------------------------------------------------------------------------------------
# Terminal table
# --------------------------------------------------------------------------------------------
def table(g: nx.DiGraph, T: int, dtype_bytes: int = 4) -> str:
    """A fixed-width table, one row per node in execution order, then a totals row."""
    head = ["#", "node", "kind", "params", f"FLOPs/tok@T={T}", f"state@T={T}", "note"]
    rows = []
    for i, nid in enumerate(execution_order(g)):
        a = g.nodes[nid]
        rows.append([str(i), nid, kind_label(a), human(a.get("params", 0)),
                     human(a["flops"](T)), human_bytes(a["state_bytes"](T, dtype_bytes)),
                     ", ".join(node_notes(g, nid))])
    tot = totals(g, T, dtype_bytes)
    last = ["", "total", f"{len(rows)} nodes", human(tot["params"]),
            human(tot["flops_per_token"]), human_bytes(tot["state_bytes"]), ""]
    widths = [max(len(r[c]) for r in [head, last] + rows) for c in range(len(head))]
    right = {0, 3, 4, 5}

    def fmt(r):
        cells = [r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c])
                 for c in range(len(r))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule] + [fmt(r) for r in rows] + [rule, fmt(last)])


def summary(g: nx.DiGraph, T: int, title: str | None = None, width: int = 96) -> list[str]:
    """Title lines of a picture: a heading with the parameter count, FLOPs and state at
    ``T``, then counting and the pattern (cut into lines of at most ``width`` symbols)."""
    tot = totals(g, T)
    subs = [a for _, a in g.nodes(data=True) if a.get("op") in ("residual", "combine")]
    counting = g.graph.get("counting", "?")
    depth = f"{len(subs)} sub-layers" + (f" ({1 + max(a['layer'] for a in subs)} layers)"
                                         if counting == "hf" and subs else "")
    pattern = str(g.graph.get("pattern", "?"))
    cuts = [pattern[i:i + width] for i in range(0, len(pattern), width)] or [""]
    return [f"{title + ': ' if title else ''}{depth}, {human(tot['params'])} params",
            f"at T={T}: {human(tot['flops_per_token'])} FLOPs/token, "
            f"{human_bytes(tot['state_bytes'])} state",
            f"counting {counting}, pattern {cuts[0]}"] + cuts[1:]


def label_lines(g: nx.DiGraph, nid: str) -> list[str]:
    """Lines of a node's label in a picture: title, parameters (unless it shares another
    node's), notes."""
    a = g.nodes[nid]
    own = [] if a.get("shares") else [f"{human(a.get('params', 0))} params"]
    return [node_title(g, nid)] + own + node_notes(g, nid, picture=True)


def _parallel_groups(g: nx.DiGraph) -> dict[str, list[str]]:
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


# --------------------------------------------------------------------------------------------
# DOT and Mermaid
# --------------------------------------------------------------------------------------------
def _dq(s: str) -> str:
    """A DOT double-quoted string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(g: nx.DiGraph, T: int, title: str | None = None) -> str:
    """Graphviz DOT text: boxes coloured by kind, parallel sub-layers as clusters with their
    branches on one rank, dotted residual and dashed ``shares`` edges, and the columns of
    :func:`columns` (edges into the next column do not constrain the ranks; orthogonal
    splines route them through the gutters)."""
    label = "\\n".join(_dq(s)[1:-1] for s in summary(g, T, title, width=64))
    out = ["digraph layers {",
           f'  graph [rankdir=TB, splines=ortho, labelloc=t, fontname="Helvetica", fontsize=12, '
           f'nodesep=0.25, ranksep=0.3, label="{label}"];',
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, '
           'margin="0.12,0.04"];',
           '  edge [color="#455A64", arrowsize=0.6, fontname="Helvetica"];']
    groups = _parallel_groups(g)
    in_group = {b for bs in groups.values() for b in bs}

    def node_line(nid):
        a = g.nodes[nid]
        style = '"rounded,filled,dashed"' if a.get("shares") else '"rounded,filled"'
        label = "\n".join(label_lines(g, nid))
        return (f"{_dq(nid)} [label={_dq(label)}, "
                f"fillcolor={_dq(kind_colour(a.get('kind', '')))}, style={style}];")

    for nid in execution_order(g):
        if nid in in_group:
            continue
        if nid in groups:
            a = g.nodes[nid]
            out += [f"  subgraph {_dq('cluster_' + nid)} {{",
                    f"    label={_dq(nid + ' ' + kind_label(a))}; style=\"rounded,dashed\"; "
                    f"color=\"#78909C\"; fontsize=10;"]
            out += [f"    {node_line(b)}" for b in groups[nid]]
            order = " -> ".join(_dq(b) for b in groups[nid])
            out += [f"    {{rank=same; {order} [style=invis]}}",
                    f"    {node_line(nid)}", "  }"]
        else:
            out.append(f"  {node_line(nid)}")
    styles = {"residual": ["style=dotted"],
              "shares": ["style=dashed", 'color="#8E24AA"', "constraint=false"]}
    col = {n: ci for ci, c in enumerate(columns(g)) for s in c for r in s for n in r}
    for u, v, kind in drawn_edges(g):
        attrs = list(styles.get(kind, []))
        if col[u] != col[v] and kind != "shares":  # wrap into the next column, as drawn
            attrs.append("constraint=false")
        out.append(f"  {_dq(u)} -> {_dq(v)}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    out.append("}")
    return "\n".join(out) + "\n"


def _mermaid_ids(g: nx.DiGraph) -> dict[str, str]:
    """Node id -> a Mermaid-safe id (``L3.b0`` -> ``n_L3_b0``), unique."""
    ids: dict[str, str] = {}
    for nid in g.nodes:
        base = "n_" + re.sub(r"\W", "_", nid)
        mid, k = base, 1
        while mid in ids.values():
            mid, k = f"{base}_{k}", k + 1
        ids[nid] = mid
    return ids


def _mq(s: str) -> str:
    """Text for inside a quoted Mermaid label (entity codes for quotes, angle brackets, #)."""
    return (s.replace("#", "#35;").replace('"', "#quot;").replace("<", "#lt;")
            .replace(">", "#gt;"))


def to_mermaid(g: nx.DiGraph, T: int, title: str | None = None) -> str:
    """Mermaid flowchart text: one class per kind, parallel sub-layers as subgraphs, dashed
    ``shares`` links."""
    ids = _mermaid_ids(g)
    out = ["flowchart TB"] + [f"  %% {line}" for line in summary(g, T, title)]
    groups = _parallel_groups(g)
    in_group = {b for bs in groups.values() for b in bs}

    def node_line(nid):
        return f'{ids[nid]}["{"<br/>".join(_mq(s) for s in label_lines(g, nid))}"]'

    for nid in execution_order(g):
        if nid in in_group:
            continue
        if nid in groups:
            out.append(f'  subgraph sg_{ids[nid]} ["{_mq(nid + " " + kind_label(g.nodes[nid]))}"]')
            out += [f"    {node_line(b)}" for b in groups[nid]] + [f"    {node_line(nid)}",
                                                                      "  end"]
        else:
            out.append(f"  {node_line(nid)}")
    arrows = {"data": "-->", "residual": "-->|residual|", "shares": "-.->|shares|"}
    out += [f"  {ids[u]} {arrows.get(k, '-->')} {ids[v]}" for u, v, k in drawn_edges(g)]
    kinds = sorted({a.get("kind", "") for _, a in g.nodes(data=True)})
    for kind in kinds:
        cls = "k_" + re.sub(r"\W", "_", kind)
        members = [ids[n] for n, k in g.nodes(data="kind") if k == kind]
        out += [f"  classDef {cls} fill:{kind_colour(kind)},stroke:#37474F,color:#212121",
                f"  class {','.join(members)} {cls}"]
    out += [f"  style {ids[n]} stroke-dasharray:5 3" for n, a in g.nodes(data=True)
            if a.get("shares")]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def draw(g: nx.DiGraph, out_dir: Path, T: int, formats=FORMATS, engine: str = "auto",
         title: str | None = None) -> dict[str, Path]:
    """Write ``layers.<fmt>`` for each of ``formats`` into ``out_dir``; return fmt -> path.

    ``engine``: ``dot`` renders SVG/PNG with graphviz, ``builtin`` with matplotlib, ``auto``
    with graphviz when its ``dot`` binary is on the PATH. If ``dot`` fails, the builtin
    renderer takes over with a warning; ``engine="dot"`` without graphviz installed raises
    :class:`HycompError`. DOT and Mermaid text are written whatever the engine.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or engine not in ENGINES:
        raise HycompError(f"unknown {'format ' + bad[0] if bad else 'engine ' + repr(engine)}",
                          where="viz", why=f"formats: {', '.join(FORMATS)}; engines: "
                          f"{', '.join(ENGINES)}", fix="pick from those")
    dot_bin = shutil.which("dot")
    if engine == "dot" and dot_bin is None:
        raise HycompError("graphviz `dot` is not installed", where="engine=dot",
                          why="the dot engine runs graphviz's `dot` binary, not on the PATH",
                          fix="install graphviz (apt-get install graphviz, brew install "
                              "graphviz, conda install graphviz), or use engine=builtin")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {f: out_dir / f"layers.{f}" for f in formats}
    dot_text = to_dot(g, T, title)
    if "dot" in paths:
        paths["dot"].write_text(dot_text, encoding="utf-8")
    if "mmd" in paths:
        paths["mmd"].write_text(to_mermaid(g, T, title), encoding="utf-8")
    images = {f: p for f, p in paths.items() if f in ("svg", "png")}
    if images and engine != "builtin" and dot_bin is not None:
        try:
            for fmt, p in images.items():
                dpi = ["-Gdpi=120"] if fmt == "png" else []
                subprocess.run([dot_bin, f"-T{fmt}", *dpi, "-o", str(p)],
                               input=dot_text.encode(), capture_output=True, check=True,
                               timeout=120)
            return paths
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", None)
            detail = detail.decode(errors="replace").strip() if detail else str(err)
            warnings.warn(f"graphviz dot failed ({detail[:200]}); drawing with the builtin "
                          "renderer", RuntimeWarning, stacklevel=2)
    if images:
        from composer.viz.builtin import render
        render(g, T, images, title)
    return paths
