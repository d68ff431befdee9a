"""The layer graph as text: a terminal table, a summary, DOT and Mermaid sources."""
from __future__ import annotations

import re

import networkx as nx

from composer.build.costs import totals
from composer.build.graph import execution_order
from composer.viz.labels import (columns, drawn_edges, human, human_bytes, kind_colour,
                                 kind_label, label_lines, node_notes, parallel_groups)


def table(g: nx.DiGraph, T: int, dtype_bytes: int = 4, max_rows: int | None = None) -> str:
    """A fixed-width table, one row per node in execution order, then a totals row; with
    ``max_rows``, a longer table keeps its first and last rows and says how many it left out."""
    head = ["#", "node", "kind", "params", f"FLOPs/tok@T={T}", f"state@T={T}", "note"]
    rows = []
    order = execution_order(g)
    skip = range(0)
    if max_rows is not None and len(order) > max_rows:
        skip = range(max_rows - 10, len(order) - 10)
    for i, nid in enumerate(order):
        if i in skip:
            if i == skip.start:
                rows.append(["...", "", "", "", "", "", f"{len(skip):,} nodes not shown"])
            continue
        a = g.nodes[nid]
        rows.append([str(i), nid, kind_label(a), human(a.get("params", 0)),
                     human(a["flops"](T)), human_bytes(a["state_bytes"](T, dtype_bytes)),
                     ", ".join(node_notes(g, nid))])
    tot = totals(g, T, dtype_bytes)
    last = ["", "total", f"{len(order)} nodes", human(tot["params"]),
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
    groups = parallel_groups(g)
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
    groups = parallel_groups(g)
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
