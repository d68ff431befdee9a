"""The layer graph's layout: a ``networkx.DiGraph`` the model is compiled from (so the picture
runs). :mod:`composer.build.costs` adds the cost attributes (``params``, ``shares``, ``flops``,
``state_bytes``) and gives the public :func:`~composer.build.costs.layer_graph`.

Nodes (ids): ``embed``, ``L{i}`` per residual sub-layer, ``L{i}.b{j}`` per parallel branch,
``norm``, ``head``. Node attributes:

    op          embed | residual | branch | combine | norm | head
    kind, name  block type and recipe block name (sub-layers)
    role        mixer | ffn | composite (sub-layers)
    spec        the block's Pydantic spec (sub-layers)
    index       sub-layer index; layer: HF-style layer index
    module_key  path of the submodule that runs this node (``layers.3``, ``shared.attn``, ...);
                nodes with the same key share weights
    params      parameters this node owns (0 for a later visit of a shared module, and for a
                tied head); the sum over nodes is the model's parameter count
    shares      for a later visit of a shared module: the node that owns the weights (the
                tied head says ``embed``; it has no ``shares`` edge, being no visit of embed)
    flops       callable T -> forward FLOPs per token at context length T
    state_bytes callable (T, dtype_bytes=4) -> recurrent state / KV-cache bytes per sequence

Edges carry ``kind``: ``data`` (the residual stream or a branch input/output, with ``slot``
giving the order of a combine node's inputs), ``residual`` (the stream skipping a parallel
sub-layer's branches into its combine node) and ``shares`` (owner -> later visit; not data).

Why shared weights are separate visit nodes rather than one node visited twice: a node visited
twice makes the data path cyclic and the execution order ambiguous; visits that name one
``module_key`` keep the data path a DAG while the drawing still links them.
"""
from __future__ import annotations

import networkx as nx

from composer.core.registry import get_block


def layout(recipe) -> nx.DiGraph:
    """Nodes and edges of a validated :class:`Recipe` (see module docstring), without costs."""
    m = recipe.model
    sched = recipe.schedule
    g = nx.DiGraph(d_model=m.d_model, vocab_size=m.vocab_size, counting=sched.counting,
                   pattern=sched.pattern, tie_embeddings=m.tie_embeddings)
    g.add_node("embed", op="embed", kind="embed", name="embed", module_key="embed")
    prev = "embed"
    for e in sched.entries:
        nid = f"L{e.index}"
        common = dict(kind=e.kind, name=e.name, role=e.role, spec=e.spec, index=e.index,
                      layer=e.layer)
        if e.role != "composite":
            g.add_node(nid, op="residual", module_key=e.module_key, **common)
            g.add_edge(prev, nid, kind="data", slot=0)
        else:
            branch_ids = []
            for j, bname in enumerate(e.spec.branches):
                bspec = m.spec(bname)
                bid = f"{nid}.b{j}"
                g.add_node(bid, op="branch", kind=bspec.kind, name=bname,
                           role=get_block(bspec.kind).role, spec=bspec, index=e.index,
                           layer=e.layer, module_key=f"{e.module_key}.branches.{j}")
                g.add_edge(prev, bid, kind="data", slot=0)
                branch_ids.append(bid)
            g.add_node(nid, op="combine", module_key=f"{e.module_key}.combine", **common)
            g.add_edge(prev, nid, kind="residual", slot=0)
            for j, bid in enumerate(branch_ids):
                g.add_edge(bid, nid, kind="data", slot=j + 1)
        prev = nid
    g.add_node("norm", op="norm", kind="norm", name=m.norm, module_key="norm")
    g.add_edge(prev, "norm", kind="data", slot=0)
    g.add_node("head", op="head", kind="head", name="head", module_key="head")
    g.add_edge("norm", "head", kind="data", slot=0)
    return g


def data_inputs(g: nx.DiGraph, nid: str) -> list[str]:
    """Predecessors feeding ``nid`` (data and residual edges), in slot order."""
    preds = [(g.edges[p, nid]["slot"], p) for p in g.predecessors(nid)
             if g.edges[p, nid]["kind"] in ("data", "residual")]
    return [p for _, p in sorted(preds)]


def execution_order(g: nx.DiGraph) -> list[str]:
    """Nodes in data-flow order (ties broken by insertion order)."""
    data = nx.DiGraph()
    data.add_nodes_from(g.nodes)
    data.add_edges_from((u, v) for u, v, k in g.edges(data="kind") if k != "shares")
    order = {n: i for i, n in enumerate(g.nodes)}
    return list(nx.lexicographical_topological_sort(data, key=order.get))
