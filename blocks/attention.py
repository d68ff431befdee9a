"""Causal softmax attention: global or sliding-window, GQA/MQA, rotary position embedding.

Glossary: Hq query heads, Hkv key/value heads (GQA groups; Hkv = 1 is MQA), D head dim,
w window (a query sees itself and the w - 1 tokens before it). RoPE: Su et al. 2021, rotating
the first ``rope_fraction`` of each head's dims, pairs (i, i + d/2) as in GPT-NeoX / Llama.

State: a KV cache ``{"k", "v", "pos"}``; with a window it keeps only the last w - 1 positions,
so memory stays constant during generation.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from composer.block import Block, BlockSpec, linear_flops
from composer.kernels import op
from composer.registry import register_block


class AttentionSpec(BlockSpec):
    """Softmax attention settings."""

    kind: Literal["attention"] = "attention"
    n_heads: int = Field(4, ge=1)
    """Query heads."""
    n_kv_heads: int | None = Field(None, ge=1)
    """Key/value heads (GQA); null: n_heads (MHA); 1: MQA."""
    head_dim: int | None = Field(None, ge=1)
    """Per-head width; null: d_model / n_heads."""
    window: int | None = Field(None, ge=1)
    """Sliding window length; null: global attention."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base."""
    rope_fraction: float = Field(1.0, ge=0, le=1)
    """Share of each head's dims that RoPE rotates (0: no position encoding)."""
    bias: bool = False
    """Biases on the q/k/v/o projections."""

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def problems(self, d_model, max_seq_len):
        out = []
        if self.head_dim is None and d_model % self.n_heads:
            out.append(("n_heads", self.n_heads,
                        f"d_model {d_model} is not divisible by n_heads {self.n_heads}",
                        "pick n_heads dividing d_model, or set head_dim"))
        if self.n_heads % self.kv_heads():
            out.append(("n_kv_heads", self.n_kv_heads,
                        f"n_kv_heads {self.n_kv_heads} does not divide n_heads {self.n_heads}",
                        "use a divisor of n_heads (1 = MQA, n_heads = MHA)"))
        if self.window is not None and self.window >= max_seq_len:
            out.append(("window", self.window,
                        f"the window is not shorter than model.max_seq_len {max_seq_len}, so it "
                        "never drops a token", "use a smaller window, or window: null for "
                        "global attention"))
        rot = int(self.dim(d_model) * self.rope_fraction)
        if out:
            return out
        if self.dim(d_model) % 2 or rot % 2:
            out.append(("head_dim", self.dim(d_model), "RoPE rotates pairs of dims: the head "
                        "dim and its rotated part must be even", "use an even head_dim"))
        return out


def rope_cache(dim: int, theta: float, positions: torch.Tensor):
    """cos, sin of shape (T, dim) for RoPE over ``dim`` rotated dims (half-split pairing)."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                       device=positions.device) / dim)
    ang = positions.float()[:, None] * inv[None]                      # (T, dim/2)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, H, T, D) by position."""
    r = cos.shape[-1]
    if r == 0:
        return x
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rot = torch.cat([-x2, x1], dim=-1)
    xr = (xr.float() * cos + rot.float() * sin).to(x.dtype)
    return torch.cat([xr, xp], dim=-1)


@register_block("attention", spec=AttentionSpec, role="mixer", symbol="*",
                summary="causal softmax attention (global / sliding window, GQA, RoPE)")
class Attention(Block):
    """Causal multi-head attention with GQA, RoPE and an optional sliding window."""

    def __init__(self, spec: AttentionSpec, d_model: int):
        super().__init__(spec, d_model)
        self.hq, self.hkv, self.hd = spec.n_heads, spec.kv_heads(), spec.dim(d_model)
        self.q_proj = nn.Linear(d_model, self.hq * self.hd, bias=spec.bias)
        self.k_proj = nn.Linear(d_model, self.hkv * self.hd, bias=spec.bias)
        self.v_proj = nn.Linear(d_model, self.hkv * self.hd, bias=spec.bias)
        self.o_proj = nn.Linear(self.hq * self.hd, d_model, bias=spec.bias)
        self.rot = int(self.hd * spec.rope_fraction) // 2 * 2

    def init_state(self, batch, device, dtype):
        empty = torch.zeros(batch, self.hkv, 0, self.hd, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "pos": 0}

    def forward(self, x, state=None):
        B, T, _ = x.shape
        pos0 = 0 if state is None else state["pos"]
        q = self.q_proj(x).view(B, T, self.hq, self.hd).transpose(1, 2)     # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.hkv, self.hd).transpose(1, 2)    # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.hkv, self.hd).transpose(1, 2)
        cos, sin = rope_cache(self.rot, self.spec.rope_theta,
                              torch.arange(pos0, pos0 + T, device=x.device))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_pos0 = pos0
        if state is not None and state["k"].shape[2]:
            k_pos0 = pos0 - state["k"].shape[2]
            k = torch.cat([state["k"].to(k.dtype), k], dim=2)
            v = torch.cat([state["v"].to(v.dtype), v], dim=2)
        y = op("attention")(q, k, v, q_pos0=pos0, k_pos0=k_pos0, window=self.spec.window)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, self.hq * self.hd))
        keep = k.shape[2] if self.spec.window is None else min(k.shape[2], self.spec.window - 1)
        new_state = {"k": k[:, :, k.shape[2] - keep:], "v": v[:, :, v.shape[2] - keep:],
                     "pos": pos0 + T}
        return y, new_state

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        hq, hkv, hd = spec.n_heads, spec.kv_heads(), spec.dim(d_model)
        proj = linear_flops((d_model, hq * hd), (d_model, 2 * hkv * hd), (hq * hd, d_model))
        # a causal query at position t sees min(t + 1, w) keys; mean over t = 1..T
        ctx = _mean_visible(T, spec.window)
        return proj + 2 * 2 * hq * hd * ctx          # q.k scores and p.v, 2 FLOPs per MAC

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        kept = T if spec.window is None else min(T, spec.window - 1)
        return 2 * spec.kv_heads() * spec.dim(d_model) * kept * dtype_bytes


def _mean_visible(T: int, window: int | None) -> float:
    """Mean number of keys a causal query sees over positions 1..T."""
    if window is None or window >= T:
        return (T + 1) / 2
    # positions 1..w-1 see t keys, the rest see w
    head = (window - 1) * window / 2
    return (head + (T - window + 1) * window) / T
