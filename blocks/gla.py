"""Gated linear attention (GLA): Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training" (arXiv 2312.06635).

Glossary (paper -> code): H heads; d_k = expand_k * d_model / H key width, d_v =
expand_v * d_model / H value width per head; alpha_t in (0, 1)^{d_k} the data-dependent decay,
G_t = alpha_t 1^T; tau = ``gate_temperature``; r_t the output gate.

    q, k, v = x W_Q / sqrt(d_k), x W_K, x W_V                         (per head)
    alpha_t = sigmoid(x W_a1 W_a2 + b_a)^(1/tau)                      (low-rank W_a1 W_a2)
    S_t = (alpha_t 1^T) * S_{t-1} + k_t^T v_t,   o_t = q_t S_t
    r_t = swish(x W_r + b_r)
    out = (r_t * RMSNorm_head(o_t)) W_O

The recurrence is ``gated_linear_recurrence`` with vector gates log g = logsigmoid(.) / tau over
the key dimension. The per-head norm is an RMSNorm with one weight per value channel (shared by
the heads), as in flash-linear-attention's GLA layer.
State: ``{"S": (B, H, d_k, d_v)}``, constant in T.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from composer.core.block import Block, BlockSpec, accum_dtype, linear_flops
from composer.core.kernels import op
from composer.core.norms import rms_norm
from composer.core.registry import register_block


class GLASpec(BlockSpec):
    """GLA settings (the paper's defaults)."""

    kind: Literal["gla"] = "gla"
    n_heads: int = Field(4, ge=1)
    """H: heads."""
    expand_k: float = Field(0.5, gt=0)
    """Total key width = expand_k * d_model."""
    expand_v: float = Field(1.0, gt=0)
    """Total value width = expand_v * d_model."""
    gate_low_rank: int = Field(16, ge=1)
    """Rank of the decay projection W_a1 W_a2."""
    gate_temperature: float = Field(16.0, gt=0)
    """tau: log alpha = logsigmoid(.) / tau keeps decays near 1 at initialisation."""
    norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of the per-head RMSNorm."""
    chunk_size: int = Field(64, ge=1)
    """Chunk length of the chunked recurrence."""

    def widths(self, d_model: int) -> tuple[int, int]:
        """Total (key, value) widths."""
        return int(self.expand_k * d_model), int(self.expand_v * d_model)

    def problems(self, d_model, max_seq_len):
        out = []
        for name, expand, width in zip(("expand_k", "expand_v"), (self.expand_k, self.expand_v),
                                       self.widths(d_model)):
            if width != expand * d_model or width % self.n_heads or width == 0:
                out.append((name, expand, f"{name} * d_model = {expand * d_model} is not a "
                            f"positive whole multiple of n_heads {self.n_heads}",
                            f"pick {name} so that {name} * d_model splits into the heads"))
        return out


@register_block("gla", spec=GLASpec, role="mixer", symbol="g",
                summary="gated linear attention (data-dependent decay per key dim)")
class GLA(Block):
    """Gated linear attention: linear attention with a learned decay per key channel."""

    def __init__(self, spec: GLASpec, d_model: int):
        super().__init__(spec, d_model)
        self.H = spec.n_heads
        self.kw, self.vw = spec.widths(d_model)
        self.dk, self.dv = self.kw // self.H, self.vw // self.H
        self.q_proj = nn.Linear(d_model, self.kw, bias=False)
        self.k_proj = nn.Linear(d_model, self.kw, bias=False)
        self.v_proj = nn.Linear(d_model, self.vw, bias=False)
        self.gk_down = nn.Linear(d_model, spec.gate_low_rank, bias=False)
        self.gk_up = nn.Linear(spec.gate_low_rank, self.kw, bias=True)
        self.g_proj = nn.Linear(d_model, self.vw, bias=True)
        self.o_proj = nn.Linear(self.vw, d_model, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(self.dv))

    def init_state(self, batch, device, dtype):
        acc = accum_dtype(dtype)
        return {"S": torch.zeros(batch, self.H, self.dk, self.dv, device=device, dtype=acc)}

    def forward(self, x, state=None):
        s = self.spec
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        acc = state["S"].dtype
        q = self.q_proj(x).view(B, T, self.H, self.dk).to(acc) * self.dk ** -0.5
        k = self.k_proj(x).view(B, T, self.H, self.dk).to(acc)
        v = self.v_proj(x).view(B, T, self.H, self.dv).to(acc)
        log_a = F.logsigmoid(self.gk_up(self.gk_down(x)).to(acc)) / s.gate_temperature
        o, S = op("gated_linear_recurrence")(q, k, v, log_a.view(B, T, self.H, self.dk),
                                             state["S"], chunk_size=s.chunk_size)
        o = rms_norm(o, self.norm_weight, s.norm_eps)
        y = F.silu(self.g_proj(x)) * o.reshape(B, T, self.vw).to(x.dtype)
        return self.o_proj(y), {"S": S}

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        kw, vw = spec.widths(d_model)
        r = spec.gate_low_rank
        proj = linear_flops((d_model, 2 * kw), (d_model, 2 * vw), (d_model, r), (r, kw),
                            (vw, d_model))
        return proj + 5 * kw * vw // spec.n_heads   # decay S, add k^T v, read q S per head

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        kw, vw = spec.widths(d_model)
        return kw * vw // spec.n_heads * dtype_bytes
