"""Graph -> ``ComposedModel``: modules from the block registry, a flat execution plan.

The model holds ``embed``, ``layers`` (one entry per non-shared sub-layer, keyed by its index),
``shared`` (one module per shared block name), ``norm`` and ``head``; every graph node names the
submodule that runs it (``module_key``), so the parameter names in a checkpoint read
``layers.3.block.in_proj.weight``. The plan is the graph's data-flow order; nothing else decides
what runs.
"""
from __future__ import annotations

from typing import Any

import networkx as nx
import torch
from torch import nn

from composer.build import generation
from composer.core.aux import collect_aux_losses
from composer.build.graph import data_inputs, execution_order
from composer.core.kernels import use_kernels
from composer.core.norms import RMSNorm
from composer.core.registry import get_block


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    return RMSNorm(d, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(d, eps=eps)


class SubLayer(nn.Module):
    """Pre-norm residual sub-layer: x + block(norm(x)). As a branch: block(norm(x))."""

    def __init__(self, norm: nn.Module, block: nn.Module):
        super().__init__()
        self.norm, self.block = norm, block

    def forward(self, x, state=None, residual: bool = True):
        y, state = self.block(self.norm(x), state)
        return (x + y if residual else y), state


class ParallelSubLayer(nn.Module):
    """Container of a parallel sub-layer: its branches and its combine step."""

    def __init__(self, branches: list[SubLayer], combine: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.combine = combine


def sub_layer(spec, m) -> SubLayer:
    """The pre-norm sub-layer of one (non-composite) block spec."""
    return SubLayer(make_norm(m.norm, m.d_model, m.norm_eps),
                    get_block(spec.kind).module(spec, m.d_model))


def node_module(op: str, spec, m) -> nn.Module:
    """The module that runs a graph node of kind ``op`` alone (a combine node: its combine
    step, without the branches, which are nodes of their own). The layer graph counts
    parameters on these, the model is built from them."""
    if op == "embed":
        return nn.Embedding(m.vocab_size, m.d_model)
    if op == "norm":
        return make_norm(m.norm, m.d_model, m.norm_eps)
    if op == "head":
        return nn.Linear(m.d_model, m.vocab_size, bias=False)
    if op == "combine":
        return get_block(spec.kind).module(spec, m.d_model)
    return sub_layer(spec, m)  # residual or branch: pre-norm + block


def _entry_module(attrs: dict, m) -> nn.Module:
    spec = attrs["spec"]
    if attrs["op"] == "combine":
        return ParallelSubLayer([sub_layer(m.spec(b), m) for b in spec.branches],
                                node_module("combine", spec, m))
    return sub_layer(spec, m)


class ComposedModel(nn.Module):
    """A language model compiled from a layer graph.

    ``forward(input_ids (B, T)) -> logits (B, T, V)``; with ``state`` (from ``init_state`` or a
    previous call) and ``return_state=True`` it continues a sequence and returns
    ``(logits, new_state)``. After each forward, ``aux_loss`` holds the sum of the
    auxiliary losses blocks added (:mod:`composer.core.aux`), or None.
    """

    aux_loss: torch.Tensor | None = None

    def __init__(self, graph: nx.DiGraph, model_cfg, kernels: dict[str, str] | None = None):
        super().__init__()
        m = model_cfg
        self.graph = graph
        self.kernels = dict(kernels or {})
        self.max_seq_len = m.max_seq_len
        self.embed = node_module("embed", None, m)
        self.layers = nn.ModuleDict()
        self.shared = nn.ModuleDict()
        for nid in graph.nodes:
            a = graph.nodes[nid]
            if a["op"] not in ("residual", "combine"):
                continue
            group, _, key = a["module_key"].partition(".")
            key = key.removesuffix(".combine")
            holder = self.layers if group == "layers" else self.shared
            if key not in holder:
                holder[key] = _entry_module(a, m)
        self.norm = node_module("norm", None, m)
        self.head = None if m.tie_embeddings else node_module("head", None, m)
        order = execution_order(graph)
        last_read = {i: step for step, nid in enumerate(order) for i in data_inputs(graph, nid)}
        # plan step: (node, op, module path, input nodes, values no later step reads)
        self.plan = [(nid, graph.nodes[nid]["op"], graph.nodes[nid]["module_key"],
                      data_inputs(graph, nid),
                      [v for v, last in last_read.items() if last == step])
                     for step, nid in enumerate(order)]
        self._init_weights(m.init_std)
        # the module of each plan step, looked up once (a plain list: not registered again)
        self._runs = [None if op_ in ("embed", "norm", "head") else self.get_submodule(key)
                      for _, op_, key, _, _ in self.plan]

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        """Normal(0, std) for embeddings and linear weights, zero biases; blocks keep the
        special initialisation of their own parameters (A_log, dt_bias, ...)."""
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, 0.0, std)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> dict[str, Any]:
        """Per-node state before the first token (None for nodes without state)."""
        device = device or self.embed.weight.device
        state = {}
        for (nid, op_, *_), mod in zip(self.plan, self._runs):
            if op_ in ("residual", "branch"):
                state[nid] = mod.block.init_state(batch, device, dtype)
        return state

    def forward(self, input_ids: torch.Tensor, state: dict | None = None,
                return_state: bool = False, logits_to_keep: int = 0):
        """Logits (B, T, V) of ``input_ids`` (B, T); ``logits_to_keep`` > 0: of the last that
        many positions only (the head runs on those alone; generation keeps 1)."""
        new_state: dict[str, Any] = {}
        vals: dict[str, torch.Tensor] = {}
        with use_kernels(self.kernels), collect_aux_losses() as aux:
            for (nid, op_, key, inputs, done), mod in zip(self.plan, self._runs):
                if op_ == "embed":
                    vals[nid] = self.embed(input_ids)
                elif op_ in ("residual", "branch"):
                    st = None if state is None else state.get(nid)
                    vals[nid], new_state[nid] = mod(vals[inputs[0]], st,
                                                    residual=(op_ == "residual"))
                elif op_ == "combine":
                    y, _ = mod([vals[i] for i in inputs[1:]])
                    vals[nid] = vals[inputs[0]] + y
                elif op_ == "norm":
                    vals[nid] = self.norm(vals[inputs[0]])
                else:  # head
                    h = vals[inputs[0]]
                    if logits_to_keep:
                        h = h[:, -logits_to_keep:]
                    vals[nid] = (h @ self.embed.weight.t() if self.head is None
                                 else self.head(h))
                for v in done:
                    del vals[v]
        self.aux_loss = torch.stack([a.float() for a in aux]).sum() if aux else None
        logits = vals["head"]
        return (logits, new_state) if return_state else logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- generation (composer.build.generation) ----------------------------------------------
    def init_cache(self, batch: int, capacity: int | None = None):
        """An empty :class:`~composer.build.generation.ModelCache` for ``batch`` sequences,
        global KV caches preallocated for ``capacity`` tokens in all."""
        return generation.init_cache(self, batch, capacity)

    def prefill(self, input_ids: torch.Tensor, cache, chunk_size: int | None = None):
        """Feed a prompt (B, T) into ``cache``; logits of its last position (B, V)."""
        return generation.prefill(self, input_ids, cache, chunk_size)

    def decode_step(self, tokens: torch.Tensor, cache):
        """Feed one token per row (B,) into ``cache``; logits of the next position (B, V)."""
        return generation.decode_step(self, tokens, cache)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs):
        """Hugging Face-style generation: the prompts followed by the new tokens, (B, T + n).
        Arguments: :func:`composer.build.generation.generate`."""
        return generation.generate(self, input_ids, max_new_tokens, **kwargs)
