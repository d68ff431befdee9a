"""The layer graph: a ``networkx.DiGraph`` the model is compiled from (so the picture runs).

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
import torch

from composer.core.registry import get_block


def _zero(*_a, **_k):
    return 0


def layer_graph(recipe) -> nx.DiGraph:
    """The layer graph of a validated :class:`Recipe` (see module docstring)."""
    from composer.build.model import ComposedModel

    m = recipe.model
    sched = recipe.schedule
    g = nx.DiGraph(d_model=m.d_model, vocab_size=m.vocab_size, counting=sched.counting,
                   pattern=sched.pattern, tie_embeddings=m.tie_embeddings)
    d, V = m.d_model, m.vocab_size
    g.add_node("embed", op="embed", kind="embed", name="embed", module_key="embed",
               flops=_zero, state_bytes=_zero)
    prev = "embed"
    norm_flops = 5.0 * d  # pre-norm (square, mean, scale, weight) + residual add, per token
    for e in sched.entries:
        nid = f"L{e.index}"
        bt = get_block(e.kind)
        common = dict(kind=e.kind, name=e.name, role=e.role, spec=e.spec, index=e.index,
                      layer=e.layer)
        if e.role != "composite":
            g.add_node(nid, op="residual", module_key=e.module_key,
                       flops=_flops(bt.module, e.spec, d, norm_flops),
                       state_bytes=_state(bt.module, e.spec, d), **common)
            g.add_edge(prev, nid, kind="data", slot=0)
        else:
            branch_ids = []
            for j, bname in enumerate(e.spec.branches):
                bspec = m.spec(bname)
                bbt = get_block(bspec.kind)
                bid = f"{nid}.b{j}"
                g.add_node(bid, op="branch", kind=bspec.kind, name=bname, role=bbt.role,
                           spec=bspec, index=e.index, layer=e.layer,
                           module_key=f"{e.module_key}.branches.{j}",
                           flops=_flops(bbt.module, bspec, d, 4.0 * d),
                           state_bytes=_state(bbt.module, bspec, d))
                g.add_edge(prev, bid, kind="data", slot=0)
                branch_ids.append(bid)
            g.add_node(nid, op="combine", module_key=f"{e.module_key}.combine",
                       flops=_flops(bt.module, e.spec, d, 1.0 * d), state_bytes=_zero, **common)
            g.add_edge(prev, nid, kind="residual", slot=0)
            for j, bid in enumerate(branch_ids):
                g.add_edge(bid, nid, kind="data", slot=j + 1)
        prev = nid
    g.add_node("norm", op="norm", kind="norm", name=m.norm, module_key="norm",
               flops=lambda T, _d=d: 4.0 * _d, state_bytes=_zero)
    g.add_edge(prev, "norm", kind="data", slot=0)
    g.add_node("head", op="head", kind="head", name="head", module_key="head",
               flops=lambda T: 2.0 * d * V, state_bytes=_zero)
    g.add_edge("norm", "head", kind="data", slot=0)

    # parameters: count the real modules (built on the meta device: no memory, no init)
    with torch.device("meta"):
        mods = ComposedModel(g, m)
    owner: dict[str, str] = {}
    for nid in nx.topological_sort(g):
        key = g.nodes[nid]["module_key"]
        if nid == "head" and m.tie_embeddings:
            g.nodes[nid].update(params=0, shares="embed")
            continue
        first = owner.get(key)
        if first is not None:
            g.nodes[nid].update(params=0, shares=first)
            g.add_edge(first, nid, kind="shares")
            continue
        owner[key] = nid
        g.nodes[nid]["params"] = sum(p.numel() for p in _owned_params(mods, key))
    return g


def _owned_params(mods, key: str):
    mod = mods.get_submodule(key)
    if key.endswith(".combine") or ".branches." in key:
        return list(mod.parameters())
    # a parallel sub-layer's container: its branches and combine are separate nodes
    return [p for n, p in mod.named_parameters()
            if not (n.startswith("branches.") or n.startswith("combine."))]


def _flops(module_cls, spec, d, extra):
    return lambda T: float(module_cls.flops_per_token(spec, d, T)) + extra


def _state(module_cls, spec, d):
    return lambda T, dtype_bytes=4: int(module_cls.state_bytes(spec, d, T, dtype_bytes))


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


def totals(g: nx.DiGraph, T: int, dtype_bytes: int = 4) -> dict:
    """Model totals: parameters, forward FLOPs per token at context T, state bytes at T."""
    return {
        "params": int(sum(a.get("params", 0) for _, a in g.nodes(data=True))),
        "flops_per_token": float(sum(a["flops"](T) for _, a in g.nodes(data=True))),
        "state_bytes": int(sum(a["state_bytes"](T, dtype_bytes) for _, a in g.nodes(data=True))),
    }
