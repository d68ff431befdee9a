"""Multi-scale retention (RetNet): Sun et al. 2023, "Retentive Network" (arXiv 2307.08621).

Glossary (paper -> code): h heads; gamma_h = 1 - 2^(-5-h) the fixed decay of head h (h = 0..);
d_k = key width per head, d_v = value width per head (the paper: 2 d_model / h);
Theta = the rotation of q and k by position (RoPE, Su et al. 2021).

    Q = rot(X W_Q), K = rot(X W_K) / sqrt(d_k), V = X W_V
    S_t = gamma_h S_{t-1} + K_t^T V_t,   retention_t = Q_t S_t            (per head)
    Y = GroupNorm_h(retention)                                           (one group per head)
    out = (swish(X W_G) * Y) W_O

Retention is ``gated_linear_recurrence`` with the scalar gate log gamma_h. The paper's parallel
form also rescales the decay matrix and the scores per row; GroupNorm cancels any positive
per-token, per-head scale, so the block leaves them out. xPos's extra factor zeta^n on queries
and zeta^-n on keys is left out too: with gamma it is a second recency bias, and zeta^-n
overflows at long T; ``rope`` keeps the rotation.
State: ``{"S": (B, h, d_k, d_v), "pos": int}``, constant in T.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from blocks.common import RopeTable, apply_rope, heads_problem
from composer.core.block import Block, BlockSpec, accum_dtype, linear_flops
from composer.core.kernels import op
from composer.core.registry import register_block


class RetNetSpec(BlockSpec):
    """Multi-scale retention settings (the paper's defaults)."""

    kind: Literal["retnet"] = "retnet"
    n_heads: int = Field(4, ge=1)
    """h: heads; head h decays with gamma_h = 1 - 2^(-5-h)."""
    head_dim: int | None = Field(None, ge=1)
    """d_k: query/key width per head; null: d_model / n_heads."""
    expand_v: float = Field(2.0, gt=0)
    """Value width = expand_v * d_model (the paper: 2), split over the heads."""
    rope: bool = True
    """Rotate queries and keys by position (RoPE; xPos without its decay factor)."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base."""
    norm_eps: float = Field(1e-5, gt=0)
    """GroupNorm epsilon."""
    chunk_size: int = Field(64, ge=1)
    """Chunk length of the chunked recurrence."""

    def dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def value_width(self, d_model: int) -> int:
        return int(self.expand_v * d_model)

    def problems(self, d_model, max_seq_len):
        out = heads_problem(d_model, self.n_heads, self.head_dim)
        if not out and self.rope and self.dim(d_model) % 2:
            out.append(("head_dim", self.dim(d_model), "RoPE rotates pairs of dims",
                        "use an even head_dim, or rope: false"))
        vw = self.value_width(d_model)
        if vw != self.expand_v * d_model or vw % self.n_heads:
            out.append(("expand_v", self.expand_v, f"expand_v * d_model = "
                        f"{self.expand_v * d_model} is not a whole multiple of n_heads "
                        f"{self.n_heads}", "pick expand_v so the value width splits evenly"))
        return out


@register_block("retnet", spec=RetNetSpec, role="mixer", symbol="R",
                summary="RetNet multi-scale retention (fixed decay per head)")
class RetNet(Block):
    """Multi-scale retention: linear attention with a fixed decay per head."""

    def __init__(self, spec: RetNetSpec, d_model: int):
        super().__init__(spec, d_model)
        self.H, self.dk = spec.n_heads, spec.dim(d_model)
        self.vw = spec.value_width(d_model)
        self.dv = self.vw // self.H
        self.q_proj = nn.Linear(d_model, self.H * self.dk, bias=False)
        self.k_proj = nn.Linear(d_model, self.H * self.dk, bias=False)
        self.v_proj = nn.Linear(d_model, self.vw, bias=False)
        self.g_proj = nn.Linear(d_model, self.vw, bias=False)
        self.o_proj = nn.Linear(self.vw, d_model, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(self.vw))
        self.norm_bias = nn.Parameter(torch.zeros(self.vw))
        self.rope = RopeTable(self.dk, spec.rope_theta)
        self.register_buffer("log_gamma", torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(
            self.H, dtype=torch.float64))), persistent=False)                     # (H,)

    def init_state(self, batch, device, dtype):
        acc = accum_dtype(dtype)
        return {"S": torch.zeros(batch, self.H, self.dk, self.dv, device=device, dtype=acc),
                "pos": 0}

    def forward(self, x, state=None):
        s = self.spec
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        acc = state["S"].dtype
        q = self.q_proj(x).view(B, T, self.H, self.dk)
        k = self.k_proj(x).view(B, T, self.H, self.dk)
        if s.rope:
            cos, sin = self.rope.get(state["pos"], T, x.device, x.dtype)       # (T, d_k)
            cos, sin = cos[:, None], sin[:, None]                               # over heads
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.v_proj(x).view(B, T, self.H, self.dv)
        log_g = self.log_gamma.to(acc).expand(B, T, self.H)
        o, S = op("gated_linear_recurrence")(q.to(acc), k.to(acc) / math.sqrt(self.dk),
                                             v.to(acc), log_g, state["S"],
                                             chunk_size=s.chunk_size)
        y = F.group_norm(o.reshape(B * T, self.vw), self.H, self.norm_weight.to(acc),
                         self.norm_bias.to(acc), s.norm_eps).view(B, T, self.vw)
        y = self.o_proj((F.silu(self.g_proj(x)) * y.to(x.dtype)))
        return y, {"S": S, "pos": state["pos"] + T}

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        H, dk, vw = spec.n_heads, spec.dim(d_model), spec.value_width(d_model)
        proj = linear_flops((d_model, 2 * H * dk), (d_model, 2 * vw), (vw, d_model))
        return proj + 5 * dk * vw          # decay S (1), add k v^T (2), read q S (2)

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        return spec.dim(d_model) * spec.value_width(d_model) * dtype_bytes
