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

import gc
from contextlib import contextmanager
from functools import lru_cache

import networkx as nx
import torch

from composer.build.graph import layout
from composer.build.model import node_module
from composer.core.errors import RecipeError
from composer.core.registry import get_block


def _zero(*_a, **_k):
    return 0


def layer_graph(recipe) -> nx.DiGraph:
    """The layer graph of a validated :class:`Recipe`, every node with its costs."""
    with gc_paused():
        g = layout(recipe)
        _add_flops_and_state(g)
        _add_params(g, recipe.model)
    return g


@contextmanager
def gc_paused():
    """No cyclic garbage collection inside: building a graph of 10^5 nodes allocates millions
    of objects that all stay alive, and each collection pass would scan them all again (it
    took more time than the build itself at 200,000 sub-layers)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _add_flops_and_state(g: nx.DiGraph) -> None:
    d, V = g.graph["d_model"], g.graph["vocab_size"]
    # per token: pre-norm (square, mean, scale, weight) + residual add; a branch has no add;
    # a combine step one pass
    extra = {"residual": 5.0 * d, "branch": 4.0 * d, "combine": 1.0 * d}
    fns: dict[tuple, tuple] = {}  # one pair of (memoised) callables per op and spec object
    for nid, a in g.nodes(data=True):
        if a["op"] in extra:
            k = (a["op"], id(a["spec"]))
            if k not in fns:
                cls = get_block(a["kind"]).module
                fns[k] = (_flops(cls, a["spec"], d, extra[a["op"]]),
                          _state(cls, a["spec"], d) if a["op"] != "combine" else _zero,
                          a["spec"])
            a["flops"], a["state_bytes"] = fns[k][:2]
        else:
            a["flops"] = {"norm": lambda T: 4.0 * d,
                          "head": lambda T: 2.0 * d * V}.get(a["op"], _zero)
            a["state_bytes"] = _zero


def _add_params(g: nx.DiGraph, model_cfg) -> None:
    """Owned parameters per node. Each distinct module is built once on the meta device (a
    sub-layer's count depends on its spec alone), so this is linear in depth with a small
    constant: 100,000 layers of one spec build one module, not 100,000."""
    owner: dict[str, str] = {}
    cache: dict = {}
    for nid in nx.topological_sort(g):
        a = g.nodes[nid]
        key = a["module_key"]
        if nid == "head" and model_cfg.tie_embeddings:
            a.update(params=0, shares="embed")
            continue
        first = owner.get(key)
        if first is not None:
            a.update(params=0, shares=first)
            g.add_edge(first, nid, kind="shares")
            continue
        owner[key] = nid
        a["params"] = _count(a, model_cfg, cache)


def _count(a: dict, m, cache: dict) -> int:
    """Parameters of the module that runs node ``a`` (its branches and combine step are
    nodes of their own), built on the meta device once per distinct spec."""
    op, spec = a["op"], a.get("spec")
    ck = (op, id(spec))
    if ck in cache:
        return cache[ck][1]
    try:
        with torch.device("meta"):
            mod = node_module(op, spec, m)
    except (RuntimeError, TypeError, OverflowError) as e:  # sizes past 2**63, even on meta
        why = str(e).strip().splitlines()[0]
        raise RecipeError(what="the model is too large to build",
                          where=f"model.blocks.{a['name']}" if spec is not None else
                          "model.d_model",
                          why=f"a tensor of this {a.get('kind', op)} (d_model={m.d_model:,}) "
                              f"cannot exist, not even on the meta device: {why}",
                          fix="use a smaller model.d_model or smaller sizes in that "
                              "block's settings") from None
    n = sum(p.numel() for p in mod.parameters())
    cache[ck] = (spec, n)  # keeps spec alive so its id stays unique
    return n


def _flops(module_cls, spec, d, extra):
    @lru_cache(maxsize=64)
    def flops(T):
        return float(module_cls.flops_per_token(spec, d, T)) + extra
    return flops


def _state(module_cls, spec, d):
    @lru_cache(maxsize=64)
    def state_bytes(T, dtype_bytes=4):
        return int(module_cls.state_bytes(spec, d, T, dtype_bytes))
    return state_bytes


def totals(g: nx.DiGraph, T: int, dtype_bytes: int = 4) -> dict:
    """Model totals: parameters, forward FLOPs per token at context T, state bytes at T."""
    return {
        "params": int(sum(a.get("params", 0) for _, a in g.nodes(data=True))),
        "flops_per_token": float(sum(a["flops"](T) for _, a in g.nodes(data=True))),
        "state_bytes": int(sum(a["state_bytes"](T, dtype_bytes) for _, a in g.nodes(data=True))),
    }
