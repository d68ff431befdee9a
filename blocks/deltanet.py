"""DeltaNet mixer: linear attention whose memory is edited by the delta rule.

Yang, Wang, Zhang, Shen & Kim 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length" (arXiv 2406.06484), after Schlag, Irie & Schmidhuber 2021.

Glossary (paper -> code): H heads of width d (keys and values alike), beta_t in (0, 1) the
write strength per head and token (in (0, 2) with ``neg_eigval``: Grazzi et al. 2024,
"Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues").

    q, k, v = silu(causal_depthwise_conv1d([W_q x, W_k x, W_v x]))   (no conv: silu only)
    q = l2norm(q) / sqrt(d),  k = l2norm(k),  beta = sigmoid(W_b x)
    S_t = S_{t-1} - beta_t k_t (k_t^T S_{t-1} - v_t^T) = (I - beta_t k_t k_t^T) S_{t-1}
          + beta_t k_t v_t^T,       o_t = S_t^T q_t
    out = W_o rmsnorm(o)                                           (norm per head)

The recurrence is the ``delta_rule`` op with v -> beta v, b = -beta (times k), no decay.
State: ``{"conv": (B, 3 H d, d_conv - 1), "recurrent": (B, H, d, d)}``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from blocks.common import causal_conv, heads_problem, l2norm
from composer.core.block import Block, BlockSpec, accum_dtype, linear_flops
from composer.core.kernels import op
from composer.core.norms import rms_norm
from composer.core.registry import register_block


class DeltaNetSpec(BlockSpec):
    """DeltaNet settings (the paper's: SiLU and l2-norm on q, k; short convolutions; output
    RMSNorm)."""

    kind: Literal["deltanet"] = "deltanet"
    n_heads: int = Field(4, ge=1)
    """H: heads."""
    head_dim: int | None = Field(None, ge=1)
    """d: key and value width per head; null: d_model / n_heads."""
    d_conv: int = Field(4, ge=0)
    """Width of the causal depthwise convolutions over q, k, v; 0: none."""
    neg_eigval: bool = False
    """beta in (0, 2) instead of (0, 1): I - beta k k^T may flip sign along k."""
    chunk_size: int = Field(32, ge=1)
    """Chunk length of the chunked delta-rule backend."""
    norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of the output RMSNorm (the l2-norm of q, k uses 1e-6)."""
    bias: bool = False
    """Biases in the q/k/v/o projections."""

    def dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def problems(self, d_model, max_seq_len):
        return heads_problem(d_model, self.n_heads, self.head_dim)


@register_block("deltanet", spec=DeltaNetSpec, role="mixer", symbol="D",
                summary="DeltaNet: delta-rule linear attention, chunked")
class DeltaNet(Block):
    """DeltaNet mixer: per-head key-value memory corrected toward each new value."""

    def __init__(self, spec: DeltaNetSpec, d_model: int):
        super().__init__(spec, d_model)
        self.H, self.d = spec.n_heads, spec.dim(d_model)
        inner = self.H * self.d
        self.q_proj = nn.Linear(d_model, inner, bias=spec.bias)
        self.k_proj = nn.Linear(d_model, inner, bias=spec.bias)
        self.v_proj = nn.Linear(d_model, inner, bias=spec.bias)
        self.b_proj = nn.Linear(d_model, self.H, bias=True)
        self.conv1d = (nn.Conv1d(3 * inner, 3 * inner, spec.d_conv, groups=3 * inner,
                                 bias=False) if spec.d_conv else None)
        self.norm_weight = nn.Parameter(torch.ones(self.d))
        self.o_proj = nn.Linear(inner, d_model, bias=spec.bias)

    def init_state(self, batch, device, dtype):
        acc = accum_dtype(dtype)
        conv = max(self.spec.d_conv - 1, 0)
        return {"conv": torch.zeros(batch, 3 * self.H * self.d, conv, device=device,
                                    dtype=dtype),
                "recurrent": torch.zeros(batch, self.H, self.d, self.d, device=device,
                                         dtype=acc)}

    def forward(self, x, state=None):
        s = self.spec
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)  # (B, T, 3Hd)
        conv_state = state["conv"]
        if self.conv1d is not None:
            qkv, conv_state = causal_conv(self.conv1d, qkv, conv_state)
        acc = state["recurrent"].dtype
        q, k, v = F.silu(qkv).to(acc).view(B, T, 3, self.H, self.d).unbind(2)   # (B,T,H,d)
        q, k = l2norm(q, 1e-6) * self.d ** -0.5, l2norm(k, 1e-6)
        beta = torch.sigmoid(self.b_proj(x).to(acc)) * (2.0 if s.neg_eigval else 1.0)
        o, rec = op("delta_rule")(q, k, v * beta[..., None], -beta, None, state["recurrent"],
                                  chunk_size=s.chunk_size)
        o = rms_norm(o, self.norm_weight, s.norm_eps)
        o = o.to(x.dtype).reshape(B, T, self.H * self.d)
        return self.o_proj(o), {"conv": conv_state, "recurrent": rec}

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        H, d = spec.n_heads, spec.dim(d_model)
        inner = H * d
        proj = linear_flops((d_model, 3 * inner), (d_model, H), (inner, d_model))
        conv = 2 * 3 * inner * spec.d_conv
        # recurrent form per head: read k^T S (2), rank-1 update (2), read S^T q (2), d x d
        return proj + conv + 6 * H * d * d

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        H, d = spec.n_heads, spec.dim(d_model)
        return (3 * H * d * max(spec.d_conv - 1, 0) + H * d * d) * dtype_bytes
