"""``chunked`` backend of ``attention``: banded / block-local chunks, O(Tq·w) for a window
and O(Tq·block_size) for blocks (global attention: one causal sdpa call)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blocks.ops.attention import OP
from blocks.ops.attention._common import _check, _dense
from composer.core.registry import register_backend

MIN_CHUNK = 64
"""Smallest query chunk of the banded form: below it the per-chunk matmuls get too small."""


def _place(x: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """(B, H, length, ...) with slot m holding x[:, :, start + m], zeros outside x."""
    T = x.shape[2]
    lo, hi = max(start, 0), min(start + length, T)
    if hi <= lo:
        return x.new_zeros(x.shape[:2] + (length,) + x.shape[3:])
    pad = [0, 0] * (x.dim() - 3) + [lo - start, start + length - hi]
    return F.pad(x[:, :, lo:hi], pad)


def layout(Tq: int, q_pos0: int, window: int | None, block_size: int | None):
    """Chunking plan (origin o, chunk c, query pad lq, key lead, key span, chunks n).

    Chunk b holds the queries at positions o + b·c + r - lq (r < c) and the keys at positions
    o - lead + b·c + m (m < span). Blocks: chunks are the blocks themselves, aligned to
    multiples of block_size (lead 0, span c). Window: chunks start at q_pos0 and reach back
    over the w - 1 earlier keys (lead = whole chunks covering w - 1). With c ~ w / 2 a query
    scores about 1.5·w keys, c >= MIN_CHUNK keeps each tile's matmuls worth a call.
    """
    if block_size is not None:
        c = block_size
        o = q_pos0 // c * c
        lq, lead, span = q_pos0 - o, 0, c
    else:
        c = max(MIN_CHUNK, -(-(window - 1) // 2))
        o, lq = q_pos0, 0
        lead = -(-(window - 1) // c) * c
        span = lead + c
    n = -(-(lq + Tq) // c)
    return o, c, lq, lead, span, n


def banded(q, k, v, q_pos0, k_pos0, window, scale, block_size, k_global, v_global):
    """The banded / block form: one sdpa over (chunk, span) tiles; see :func:`layout`."""
    B, Hq, Tq, D = q.shape
    rep = Hq // k.shape[1]
    o, c, lq, lead, span, n = layout(Tq, q_pos0, window, block_size)
    L = (n - 1) * c + span                                              # key slots in all
    kstart = o - lead - k_pos0
    kl = _place(k.repeat_interleave(rep, dim=1), kstart, L)             # (B, Hq, L, D)
    vl = _place(v.repeat_interleave(rep, dim=1), kstart, L)
    kc = kl.unfold(2, span, c).transpose(-1, -2)                        # (B, Hq, n, span, D)
    vc = vl.unfold(2, span, c).transpose(-1, -2)
    qc = _place(q, -lq, n * c).view(B, Hq, n, c, D)                     # (B, Hq, n, c, D)
    ones = torch.ones(1, 1, k.shape[2], dtype=torch.bool, device=q.device)
    valid = _place(ones, kstart, L)[0, 0].unfold(0, span, c)            # (n, span)
    d = (torch.arange(c, device=q.device)[:, None] + lead
         - torch.arange(span, device=q.device)[None, :])                # pq - pk, (c, span)
    band = d >= 0
    if window is not None:
        band &= d < window
    mask = band[None] & valid[:, None]                                  # (n, c, span)
    if k_global is not None:
        G = k_global.shape[2]
        pq = o - lq + torch.arange(n * c, device=q.device)
        mg = (torch.arange(G, device=q.device)[None] <= pq[:, None] - window).view(n, c, G)
        kg = k_global.repeat_interleave(rep, dim=1)[:, :, None].expand(B, Hq, n, G, D)
        vg = v_global.repeat_interleave(rep, dim=1)[:, :, None].expand(B, Hq, n, G, D)
        kc, vc = torch.cat([kg, kc], dim=3), torch.cat([vg, vc], dim=3)
        mask = torch.cat([mg, mask], dim=2)
    qc, kc, vc = (t.reshape(B * Hq, n, t.shape[3], D) for t in (qc, kc, vc))  # 4-d for sdpa
    y = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale)
    return y.reshape(B, Hq, n * c, D)[:, :, lq:lq + Tq]


@register_backend(OP, "chunked", priority=5)
def attention_chunked(q, k, v, *, q_pos0: int = 0, k_pos0: int = 0,
                      window: int | None = None, scale: float | None = None,
                      block_size: int | None = None, k_global=None, v_global=None):
    """Banded / block-local chunks, O(Tq·w) (global attention: one causal sdpa call)."""
    _check(window, k_global, v_global)
    args = (q, k, v, q_pos0, k_pos0, window, scale, block_size, k_global, v_global)
    if window is None and block_size is None:
        return _dense(*args)
    return banded(*args)
