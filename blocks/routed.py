"""Adaptive computation: per token, a router decides which path of a sub-layer runs.

The survey's "adaptive architectures", two modes:

* ``skip``, mixture-of-depths (Raposo et al. 2024, arXiv 2404.02258): one path; a token whose
  router gate exceeds the threshold goes through it, every other token skips it (the sub-layer
  adds nothing, the residual stream passes unchanged).
* ``choice``: several paths (mixers or FFNs); each token runs through exactly one, the argmax
  of the router's softmax (top-1 routing, as Switch's over experts, here over any blocks).

Glossary (paper -> code): r_t router logits (W_r x_t + b), g_t the gate, tau = threshold,
c = capacity, pi_t the path of token t (-1: skipped), F_i path i.

    skip:    g_t = sigmoid(r_t);  pi_t = 0 if g_t > tau else -1
    choice:  p_t = softmax(r_t);  pi_t = argmax_i p_ti;  g_t = p_t,pi_t
    y_t = g_t F_pi_t(x_t)  for routed tokens, 0 for skipped ones (the residual is added outside)

Scaling by g_t is what gives the router its gradient (Raposo et al. multiply by the raw router
weight; a sigmoid / softmax keeps the scale bounded).

Causal routing. Raposo et al. pick the top-c fraction of a whole sequence, which looks at future
tokens and cannot run token by token. Here the decision depends on x_t alone (a threshold or an
argmax), so the whole sequence, carried state and single-token steps route identically.
Their auxiliary remedy is kept as the training signal: in skip mode a binary cross-entropy
pulls sigmoid(r_t) toward "t is in the top-c fraction of its sequence" (a non-causal target,
used only in the loss), so the causal threshold learns to route about a fraction c of tokens.
In choice mode the auxiliary loss is Switch's load balance over paths
(:func:`blocks.common.balance_loss`).

State of sequence-mixer paths. A path sees only the tokens routed to it, as a compacted
subsequence per batch row: its state (recurrent state, KV cache, positions) advances on those
tokens only, and skipped tokens leave it untouched. Position-wise (FFN) paths have no state and
run on all their tokens of the batch at once.

Pattern symbol ``Y`` (a fork). Role ``mixer``: in HF counting an FFN follows it.

Paths are inline specs: a block sees only its own spec and d_model, so ``paths`` holds each
path's full settings (``{kind: attention, n_heads: 4}``), validated against the registered spec
of that kind; the sub-layer stays an ordinary node of the layer graph, and the paths are its
submodules ``paths.0``, ``paths.1``, ... (The field is not called ``branches``: the schedule
reads that name as a composite's list of recipe block names.)
Cost: a mixer path runs once per batch row per call (rows route different tokens); FFN paths
run once per call.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, SerializeAsAny, ValidationError, field_validator
from torch import nn

from blocks.common import MLPSpec, balance_loss, run_grouped
from composer.core.aux import add_aux_loss
from composer.core.block import Block, BlockSpec, linear_flops
from composer.core.errors import HycompError
from composer.core.registry import get_block, register_block


class RoutedSpec(BlockSpec):
    """Routed sub-layer settings (default: mixture-of-depths over a SwiGLU MLP)."""

    kind: Literal["routed"] = "routed"
    mode: Literal["skip", "choice"] = "skip"
    """skip: one path that tokens go through or around (mixture-of-depths); choice: each token
    runs through one of several paths."""
    paths: list[SerializeAsAny[BlockSpec]] = Field(default_factory=lambda: [MLPSpec()])
    """The paths, each the settings of a registered non-composite block with its `kind`
    (e.g. [{kind: attention, n_heads: 4}, {kind: mamba2}]); a bare type name takes its
    defaults."""
    threshold: float = Field(0.5, gt=0, lt=1)
    """skip: a token runs the path when sigmoid(router logit) exceeds this."""
    capacity: float = Field(0.5, gt=0, le=1)
    """skip: the fraction of tokens the auxiliary loss teaches the router to send through the
    path (Raposo et al.'s capacity); also the share of the path's cost in the FLOP count."""
    aux_loss_coef: float = Field(0.01, ge=0)
    """Coefficient of the router's auxiliary loss (skip: capacity BCE; choice: load balance);
    0 disables it."""

    @field_validator("paths", mode="before")
    @classmethod
    def _path_specs(cls, value: Any) -> Any:
        """Validate every path against the spec of its registered kind."""
        if not isinstance(value, (list, tuple)):
            return value
        return [_path_spec(i, p) for i, p in enumerate(value)]

    def problems(self, d_model, max_seq_len):
        out = []
        n = len(self.paths)
        if self.mode == "skip" and n != 1:
            out.append(("paths", n, f"skip mode routes tokens through one path or around it, "
                        f"{n} paths are given", "give one path, or set mode: choice"))
        if self.mode == "choice" and n < 2:
            out.append(("paths", n, "choice mode picks one of several paths, 1 is given",
                        "add a path, or set mode: skip"))
        for i, p in enumerate(self.paths):
            out += [(f"paths[{i}].{f}", v, why, fix)
                    for f, v, why, fix in p.problems(d_model, max_seq_len)]
        return out


def _path_spec(i: int, raw: Any) -> BlockSpec:
    """One entry of ``paths`` -> the validated spec of its block kind (ValueError if not)."""
    if isinstance(raw, BlockSpec):
        return raw
    raw = {"kind": raw} if isinstance(raw, str) else raw
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ValueError(f"paths[{i}] must be a block type name or a mapping with a 'kind' "
                         f"key, got {raw!r}")
    try:
        bt = get_block(raw["kind"])
    except HycompError as err:
        raise ValueError(f"paths[{i}]: {err.what} ({err.why}); {err.fix}") from None
    if bt.role == "composite":
        raise ValueError(f"paths[{i}]: '{bt.name}' is a composite block; a path must be a "
                         "mixer or an FFN")
    try:
        return bt.spec.model_validate(raw)
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                         for e in err.errors())
        raise ValueError(f"paths[{i}] ({bt.name}): {msgs}") from None


@register_block("routed", spec=RoutedSpec, role="mixer", symbol="Y",
                summary="adaptive compute: per-token router skips a path or picks one")
class Routed(Block):
    """A sub-layer whose router sends each token through one path, or around it."""

    def __init__(self, spec: RoutedSpec, d_model: int):
        super().__init__(spec, d_model)
        types = [get_block(p.kind) for p in spec.paths]
        self.paths = nn.ModuleList(bt.module(p, d_model) for bt, p in zip(types, spec.paths))
        self.position_wise = [bt.role == "ffn" for bt in types]
        self.router = nn.Linear(d_model, 1 if spec.mode == "skip" else len(spec.paths))

    def init_state(self, batch, device, dtype):
        """Per path: None for a position-wise path, else one state per batch row (each row's
        path advances on its own routed tokens)."""
        return [None if pw else [p.init_state(1, device, dtype) for _ in range(batch)]
                for p, pw in zip(self.paths, self.position_wise)]

    def decide(self, x: torch.Tensor):
        """x (B, T, D) -> router logits (B, T, n_out), path pi (B, T) (-1: skip), gate g (B, T).

        Causal: token t's decision depends on x_t only."""
        logits = self.router(x)
        if self.spec.mode == "skip":
            gate = torch.sigmoid(logits[..., 0])
            path = torch.where(gate > self.spec.threshold, 0, -1)
        else:
            gate, path = logits.softmax(-1).max(-1)
        return logits, path, gate

    def forward(self, x, state=None):
        B, T, D = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        logits, path, gate = self.decide(x)
        xf, pf, gf = x.reshape(B * T, D), path.reshape(-1), gate.reshape(-1)   # (N, D) (N,) (N,)
        # position-wise paths: every routed token of the batch at once, grouped by path
        pw = torch.tensor(self.position_wise, device=x.device)
        tok = ((pf >= 0) & pw[pf.clamp_min(0)]).nonzero()[:, 0]
        y = run_grouped(xf, tok, pf[tok], gf[tok], self.paths)                  # (N, D)
        # sequence mixers: per row, the compacted subsequence of its routed tokens
        pos, outs, new_state = [], [], []
        for i, blk in enumerate(self.paths):
            if self.position_wise[i]:
                new_state.append(None)
                continue
            rows = []
            for b in range(B):
                idx = (path[b] == i).nonzero()[:, 0]                             # (n_b,)
                st = state[i][b]
                if idx.numel():
                    o, st = blk(x[b, idx][None], st)                             # (1, n_b, D)
                    outs.append(o[0])
                    pos.append(b * T + idx)
                rows.append(st)
            new_state.append(rows)
        if outs:
            p = torch.cat(pos)
            y = y.index_add(0, p, (torch.cat(outs) * gf[p, None]).to(y.dtype))  # autocast
        if self.spec.aux_loss_coef > 0 and T:
            add_aux_loss(self.spec.aux_loss_coef * self.aux_loss(logits, path))
        return y.view(B, T, D), new_state

    def aux_loss(self, logits: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """skip: BCE(sigmoid(r_t), [t in the top-c fraction of its row]); choice: Switch load
        balance n * sum_i f_i P_i over the paths. logits (B, T, n_out), path (B, T)."""
        if self.spec.mode == "skip":
            r = logits[..., 0]                                                   # (B, T)
            k = max(1, math.ceil(self.spec.capacity * r.shape[1]))
            kth = r.detach().topk(k, dim=-1).values[..., -1:]                   # (B, 1)
            return F.binary_cross_entropy_with_logits(r, (r.detach() >= kth).to(r.dtype))
        n = logits.shape[-1]
        return balance_loss(logits.reshape(-1, n).softmax(-1), path.reshape(-1, 1), n)

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        """Router plus the expected path cost at the targeted load: capacity x the path (skip),
        the mean over paths of a uniform split (choice); a path's context is its share of T."""
        share = spec.capacity if spec.mode == "skip" else 1 / len(spec.paths)
        t = max(1, math.ceil(share * T))
        costs = [get_block(p.kind).module.flops_per_token(p, d_model, t) for p in spec.paths]
        router = linear_flops((d_model, 1 if spec.mode == "skip" else len(spec.paths)))
        return router + share * sum(costs)

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        """Sum over the paths of their state at T tokens (the bound when every token is routed
        to each)."""
        return sum(get_block(p.kind).module.state_bytes(p, d_model, T, dtype_bytes)
                   for p in spec.paths)
