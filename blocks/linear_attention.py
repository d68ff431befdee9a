"""Linear attention: Katharopoulos et al. 2020, "Transformers are RNNs" (arXiv 2006.16236).

Glossary (paper -> code): phi = ``feature_map``; H heads of width d (keys and values);
S_t = sum_{s<=t} phi(k_s) v_s^T (d x d per head), z_t = sum_{s<=t} phi(k_s).

    q, k, v = W_q x, W_k x, W_v x                        (per head)
    o_t = phi(q_t)^T S_t / (phi(q_t) . z_t + eps)         normalize: true
    o_t = rmsnorm(phi(q_t)^T S_t)                         normalize: false, output_norm: true
    out = W_o o

It is ``gated_linear_recurrence`` with G = 1 (``log_g=None``). The normaliser comes from the
same call: v carries one extra column of ones, so the state holds [S | z] and the last output
column is phi(q_t) . z_t. phi(q) is scaled by d^-1/2 (a no-op for the normalised form).
State: ``{"S": (B, H, d, d + normalize)}``, constant in T.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from blocks.common import heads_problem
from composer.core.block import Block, BlockSpec, accum_dtype, linear_flops
from composer.core.kernels import op
from composer.core.norms import rms_norm
from composer.core.registry import register_block

FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu+1": lambda x: F.elu(x) + 1,          # Katharopoulos et al. 2020
    "relu": F.relu,
    "softmax": lambda x: x.softmax(-1),        # over each head's dims: positive, sums to 1
}


class LinearAttentionSpec(BlockSpec):
    """Linear attention settings."""

    kind: Literal["linear_attention"] = "linear_attention"
    n_heads: int = Field(4, ge=1)
    """Heads."""
    head_dim: int | None = Field(None, ge=1)
    """Key and value width per head; null: d_model / n_heads."""
    feature_map: Literal["identity", "elu+1", "relu", "softmax"] = "elu+1"
    """phi applied to queries and keys: elu+1 (the paper's), relu, softmax over the head's dims,
    or identity."""
    normalize: bool = True
    """Divide by phi(q_t) . sum_{s<=t} phi(k_s) (the paper's normaliser)."""
    output_norm: bool = False
    """RMSNorm per head on the output (Qin et al. 2022, "The devil in linear transformer"), the
    usual stabiliser when ``normalize`` is off."""
    eps: float = Field(1e-6, gt=0)
    """Added to the normaliser's denominator; also the RMSNorm epsilon."""
    chunk_size: int = Field(64, ge=1)
    """Chunk length of the chunked recurrence."""

    def dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def problems(self, d_model, max_seq_len):
        out = heads_problem(d_model, self.n_heads, self.head_dim)
        if self.normalize and self.feature_map == "identity":
            out.append(("normalize", self.normalize, "with the identity feature map the "
                        "denominator phi(q) . sum phi(k) can be zero or negative",
                        "pick a positive feature map (elu+1, relu, softmax) or set "
                        "normalize: false (with output_norm: true)"))
        return out


@register_block("linear_attention", spec=LinearAttentionSpec, role="mixer", symbol="L",
                summary="linear attention (feature maps, optional normaliser)")
class LinearAttention(Block):
    """Kernelised causal attention: a running sum of phi(k) v^T per head."""

    def __init__(self, spec: LinearAttentionSpec, d_model: int):
        super().__init__(spec, d_model)
        self.H, self.d = spec.n_heads, spec.dim(d_model)
        width = self.H * self.d
        self.q_proj = nn.Linear(d_model, width, bias=False)
        self.k_proj = nn.Linear(d_model, width, bias=False)
        self.v_proj = nn.Linear(d_model, width, bias=False)
        self.o_proj = nn.Linear(width, d_model, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(self.d)) if spec.output_norm else None
        self.phi = FEATURE_MAPS[spec.feature_map]

    def init_state(self, batch, device, dtype):
        acc = accum_dtype(dtype)
        return {"S": torch.zeros(batch, self.H, self.d, self.d + self.spec.normalize,
                                 device=device, dtype=acc)}

    def forward(self, x, state=None):
        s = self.spec
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        acc = state["S"].dtype
        q = self.phi(self.q_proj(x).view(B, T, self.H, self.d).to(acc)) * self.d ** -0.5
        k = self.phi(self.k_proj(x).view(B, T, self.H, self.d).to(acc))
        v = self.v_proj(x).view(B, T, self.H, self.d).to(acc)                 # (B, T, H, d)
        if s.normalize:
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)           # (B, T, H, d+1)
        o, S = op("gated_linear_recurrence")(q, k, v, None, state["S"], chunk_size=s.chunk_size)
        if s.normalize:
            o = o[..., :-1] / (o[..., -1:] + s.eps)
        if self.norm_weight is not None:
            o = rms_norm(o, self.norm_weight, s.eps)
        y = self.o_proj(o.reshape(B, T, self.H * self.d).to(x.dtype))
        return y, {"S": S}

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        width = spec.n_heads * spec.dim(d_model)
        d = spec.dim(d_model)
        # recurrent form per head: add phi(k) v^T (2 d v), read phi(q)^T S (2 d v)
        scan = 4 * spec.n_heads * d * (d + spec.normalize)
        return linear_flops((d_model, 3 * width), (width, d_model)) + scan

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        d = spec.dim(d_model)
        return spec.n_heads * d * (d + spec.normalize) * dtype_bytes
