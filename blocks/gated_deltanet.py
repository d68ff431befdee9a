"""Gated DeltaNet mixer, laid out as Qwen3-Next's linear-attention layer.

Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(arXiv 2412.06464); the parameter layout, activations and norms follow Hugging Face's
``Qwen3NextGatedDeltaNet`` so that its weights load unchanged (``load_state_dict``).

Glossary (paper -> code): Hk key heads of width dk, Hv value heads of width dv (Hv a multiple
of Hk: each key head serves Hv / Hk consecutive value heads, like GQA); alpha_t = exp(g_t)
the decay, beta_t the write strength, one each per value head and token.

    [q, k, v, z] = in_proj_qkvz(x)   [b, a] = in_proj_ba(x)    (grouped per key head)
    q, k, v = silu(causal_depthwise_conv1d([q, k, v]))
    q = l2norm(q) / sqrt(dk),  k = l2norm(k)
    beta = sigmoid(b),  g = -exp(A_log) * softplus(a + dt_bias)
    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t
    out = out_proj(rmsnorm(o) * w * silu(z))                    (norm per value head)

The recurrence is the ``delta_rule`` op with v -> beta v, b = -alpha beta (times k),
log_w = g. State: ``{"conv": (B, conv_dim, d_conv - 1), "recurrent": (B, Hv, dk, dv)}``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from blocks.common import causal_conv, l2norm
from composer.core.block import Block, BlockSpec, accum_dtype, linear_flops
from composer.core.kernels import op
from composer.core.norms import rms_norm
from composer.core.registry import register_block


class GatedDeltaNetSpec(BlockSpec):
    """Gated DeltaNet settings (Qwen3-Next's layer; head counts and widths sized for small CPU
    models: Qwen3-Next-80B uses 16 key heads, 32 value heads, widths 128)."""

    kind: Literal["gated_deltanet"] = "gated_deltanet"
    n_k_heads: int = Field(2, ge=1)
    """Hk: query/key heads (Qwen3-Next ``linear_num_key_heads``)."""
    n_v_heads: int = Field(4, ge=1)
    """Hv: value heads, a multiple of n_k_heads (``linear_num_value_heads``)."""
    head_k_dim: int = Field(64, ge=1)
    """dk: query/key width per head (``linear_key_head_dim``)."""
    head_v_dim: int = Field(64, ge=1)
    """dv: value width per head (``linear_value_head_dim``)."""
    d_conv: int = Field(4, ge=1)
    """Width of the causal depthwise convolution over q, k, v (``linear_conv_kernel_dim``)."""
    chunk_size: int = Field(32, ge=1)
    """Chunk length of the chunked delta-rule backend."""
    norm_eps: float = Field(1e-6, gt=0)
    """Epsilon of the gated RMSNorm and of the l2-norm of q and k."""
    A_init_min: float = Field(0.01, gt=0)
    """A = exp(A_log) is initialised uniform in [A_init_min, A_init_max] per value head."""
    A_init_max: float = Field(16.0, gt=0)
    """See A_init_min."""

    def problems(self, d_model, max_seq_len):
        out = []
        if self.n_v_heads % self.n_k_heads:
            out.append(("n_v_heads", self.n_v_heads, f"n_v_heads {self.n_v_heads} is not a "
                        f"multiple of n_k_heads {self.n_k_heads}",
                        "use a multiple of n_k_heads (equal counts: one value head per key)"))
        if self.A_init_min > self.A_init_max:
            out.append(("A_init_min", self.A_init_min, f"exceeds A_init_max {self.A_init_max}",
                        "swap them"))
        return out


class GatedRMSNorm(nn.Module):
    """rmsnorm(x) * w * silu(z) over the last dim, normalised in at least float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, z):
        work = torch.promote_types(x.dtype, torch.float32)
        return (rms_norm(x, self.weight, self.eps) * F.silu(z.to(work))).to(x.dtype)


def _dims(spec: GatedDeltaNetSpec):
    key_dim = spec.n_k_heads * spec.head_k_dim
    value_dim = spec.n_v_heads * spec.head_v_dim
    return key_dim, value_dim, 2 * key_dim + value_dim


@register_block("gated_deltanet", spec=GatedDeltaNetSpec, role="mixer", symbol="G",
                summary="Gated DeltaNet (Qwen3-Next layout), chunked delta rule")
class GatedDeltaNet(Block):
    """Gated DeltaNet mixer: decayed delta-rule memory per value head, gated RMSNorm out."""

    def __init__(self, spec: GatedDeltaNetSpec, d_model: int):
        super().__init__(spec, d_model)
        self.key_dim, self.value_dim, self.conv_dim = _dims(spec)
        self.rep = spec.n_v_heads // spec.n_k_heads
        self.in_proj_qkvz = nn.Linear(d_model, 2 * self.key_dim + 2 * self.value_dim,
                                      bias=False)
        self.in_proj_ba = nn.Linear(d_model, 2 * spec.n_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, spec.d_conv,
                                groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(spec.n_v_heads))
        self.A_log = nn.Parameter(torch.empty(spec.n_v_heads))
        self.norm = GatedRMSNorm(spec.head_v_dim, spec.norm_eps)
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)
        if not self.A_log.is_meta:
            with torch.no_grad():
                self.A_log.uniform_(spec.A_init_min, spec.A_init_max).log_()

    def init_state(self, batch, device, dtype):
        s = self.spec
        acc = accum_dtype(dtype)
        return {"conv": torch.zeros(batch, self.conv_dim, s.d_conv - 1, device=device,
                                    dtype=dtype),
                # the recurrent state stays in float32 (float64 when asked) for bf16 too
                "recurrent": torch.zeros(batch, s.n_v_heads, s.head_k_dim, s.head_v_dim,
                                         device=device, dtype=acc)}

    def split(self, x: torch.Tensor):
        """x (B, T, D) -> qkv (B, T, conv_dim) ordered [q | k | v], z (B, T, Hv, dv),
        b, a (B, T, Hv): Qwen3-Next's fused projections are grouped per key head."""
        s = self.spec
        B, T, _ = x.shape
        qkvz = self.in_proj_qkvz(x).view(B, T, s.n_k_heads, -1)
        q, k, v, z = qkvz.split([s.head_k_dim, s.head_k_dim, self.rep * s.head_v_dim,
                                 self.rep * s.head_v_dim], dim=-1)
        b, a = self.in_proj_ba(x).view(B, T, s.n_k_heads, 2 * self.rep).split(self.rep, -1)
        qkv = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], -1)
        return (qkv, z.reshape(B, T, s.n_v_heads, s.head_v_dim),
                b.reshape(B, T, s.n_v_heads), a.reshape(B, T, s.n_v_heads))

    def forward(self, x, state=None):
        s = self.spec
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        qkv, z, b, a = self.split(x)
        qkv, conv_state = causal_conv(self.conv1d, qkv, state["conv"])
        qkv = F.silu(qkv)                                                     # (B, T, conv)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        acc = state["recurrent"].dtype
        q = l2norm(q.reshape(B, T, s.n_k_heads, s.head_k_dim).to(acc), s.norm_eps)
        k = l2norm(k.reshape(B, T, s.n_k_heads, s.head_k_dim).to(acc), s.norm_eps)
        if self.rep > 1:                      # value heads sharing a key head (GVA)
            q, k = q.repeat_interleave(self.rep, dim=2), k.repeat_interleave(self.rep, dim=2)
        q = q * s.head_k_dim ** -0.5                                          # (B, T, Hv, dk)
        v = v.reshape(B, T, s.n_v_heads, s.head_v_dim).to(acc)               # (B, T, Hv, dv)
        beta = torch.sigmoid(b.to(acc))                                       # (B, T, Hv)
        g = -self.A_log.to(acc).exp() * F.softplus(a.to(acc) + self.dt_bias.to(acc))
        o, rec = op("delta_rule")(q, k, v * beta[..., None], -beta * g.exp(), g,
                                  state["recurrent"], chunk_size=s.chunk_size)
        o = self.norm(o.to(x.dtype), z).reshape(B, T, self.value_dim)
        return self.out_proj(o), {"conv": conv_state, "recurrent": rec.to(acc)}

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        key_dim, value_dim, conv_dim = _dims(spec)
        proj = linear_flops((d_model, 2 * key_dim + 2 * value_dim), (d_model, 2 * spec.n_v_heads),
                            (value_dim, d_model))
        conv = 2 * conv_dim * spec.d_conv
        # recurrent form per value head: decay S (1), read k^T S (2), rank-1 update (2),
        # read S^T q (2), each over dk x dv
        rec = 7 * spec.n_v_heads * spec.head_k_dim * spec.head_v_dim
        return proj + conv + rec

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        _, _, conv_dim = _dims(spec)
        return (conv_dim * (spec.d_conv - 1)
                + spec.n_v_heads * spec.head_k_dim * spec.head_v_dim) * dtype_bytes
