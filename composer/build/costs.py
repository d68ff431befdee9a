"""The cost model, and the one owner of parameter counting.

:func:`layer_graph` lays out the graph (:func:`composer.build.graph.layout`) and gives every
node its costs:

    params       parameters this node owns, counted on the real modules built on the meta
                 device (no memory, no init); 0 for a later visit of a shared module and for a
                 tied head, so the sum over nodes is the model's parameter count
    shares       for a later visit of a shared module: the node that owns the weights (the
                 tied head says ``embed``, without a ``shares`` edge: it is no visit of embed)
    flops        callable T -> forward FLOPs per token at context length T (the block's
                 ``flops_per_token`` plus its pre-norm and residual add)
    state_bytes  callable (T, dtype_bytes=4) -> recurrent state / KV-cache bytes per sequence
"""
from __future__ import annotations

import networkx as nx
import torch

from composer.build.graph import layout
from composer.build.model import ComposedModel
from composer.core.registry import get_block


def _zero(*_a, **_k):
    return 0


def layer_graph(recipe) -> nx.DiGraph:
    """The layer graph of a validated :class:`Recipe`, every node with its costs."""
    g = layout(recipe)
    _add_flops_and_state(g)
    _add_params(g, recipe.model)
    return g


def _add_flops_and_state(g: nx.DiGraph) -> None:
    d, V = g.graph["d_model"], g.graph["vocab_size"]
    # per token: pre-norm (square, mean, scale, weight) + residual add; a branch has no add;
    # a combine step one pass
    extra = {"residual": 5.0 * d, "branch": 4.0 * d, "combine": 1.0 * d}
    for nid, a in g.nodes(data=True):
        if a["op"] in extra:
            cls = get_block(a["kind"]).module
            a["flops"] = _flops(cls, a["spec"], d, extra[a["op"]])
            a["state_bytes"] = _state(cls, a["spec"], d) if a["op"] != "combine" else _zero
        else:
            a["flops"] = {"norm": lambda T: 4.0 * d,
                          "head": lambda T: 2.0 * d * V}.get(a["op"], _zero)
            a["state_bytes"] = _zero


def _add_params(g: nx.DiGraph, model_cfg) -> None:
    with torch.device("meta"):
        mods = ComposedModel(g, model_cfg)
    owner: dict[str, str] = {}
    for nid in nx.topological_sort(g):
        key = g.nodes[nid]["module_key"]
        if nid == "head" and model_cfg.tie_embeddings:
            g.nodes[nid].update(params=0, shares="embed")
            continue
        first = owner.get(key)
        if first is not None:
            g.nodes[nid].update(params=0, shares=first)
            g.add_edge(first, nid, kind="shares")
            continue
        owner[key] = nid
        g.nodes[nid]["params"] = sum(p.numel() for p in _owned_params(mods, key))


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


def totals(g: nx.DiGraph, T: int, dtype_bytes: int = 4) -> dict:
    """Model totals: parameters, forward FLOPs per token at context T, state bytes at T."""
    return {
        "params": int(sum(a.get("params", 0) for _, a in g.nodes(data=True))),
        "flops_per_token": float(sum(a["flops"](T) for _, a in g.nodes(data=True))),
        "state_bytes": int(sum(a["state_bytes"](T, dtype_bytes) for _, a in g.nodes(data=True))),
    }
