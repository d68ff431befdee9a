"""Op ``attention``: causal softmax attention, global or sliding-window, with GQA.

Query i (absolute position ``q_pos0 + i``) sees key j (absolute position ``k_pos0 + j``) when
``0 <= pos_q - pos_k < window`` (``window=None``: no lower bound).

Shapes: q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq a multiple of Hkv. Returns (B, Hq, Tq, D).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from composer.registry import register_backend, register_op

OP = "attention"
register_op(OP, "causal softmax attention (global or sliding window, GQA)")


def visible(Tq: int, Tk: int, q_pos0: int, k_pos0: int, window: int | None,
            device) -> torch.Tensor:
    """Boolean (Tq, Tk) mask: True where query i may attend key j."""
    pq = torch.arange(Tq, device=device)[:, None] + q_pos0
    pk = torch.arange(Tk, device=device)[None, :] + k_pos0
    d = pq - pk
    m = d >= 0
    if window is not None:
        m &= d < window
    return m


@register_backend(OP, "reference", priority=0)
def attention_reference(q, k, v, *, q_pos0: int = 0, k_pos0: int = 0,
                        window: int | None = None, scale: float | None = None):
    """Explicit masked softmax(q k^T / sqrt(D)) v in the input dtype (float64-capable)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    m = visible(q.shape[2], k.shape[2], q_pos0, k_pos0, window, q.device)
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a query with no visible key gives 0
    return p @ v


@register_backend(OP, "sdpa", priority=10)
def attention_sdpa(q, k, v, *, q_pos0: int = 0, k_pos0: int = 0,
                   window: int | None = None, scale: float | None = None):
    """``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where available)."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    plain_causal = window is None and q_pos0 == k_pos0 and Tq == Tk
    if plain_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=gqa)
    m = visible(Tq, Tk, q_pos0, k_pos0, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=gqa)
