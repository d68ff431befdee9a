"""``reference`` backend of ``attention``: the explicit masked softmax, O(Tq·Tk)."""
from __future__ import annotations

import torch

from blocks.ops.attention import OP
from blocks.ops.attention._common import _all_keys, _check
from composer.core.registry import register_backend


@register_backend(OP, "reference", priority=0)
def attention_reference(q, k, v, *, q_pos0: int = 0, k_pos0: int = 0,
                        window: int | None = None, scale: float | None = None,
                        block_size: int | None = None, k_global=None, v_global=None):
    """Explicit masked softmax(q k^T · scale) v in the input dtype (float64-capable)."""
    _check(window, k_global, v_global)
    k, v, m = _all_keys(q, k, v, q_pos0, k_pos0, window, block_size, k_global, v_global)
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale                              # (B, Hq, Tq, Tk)
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a query with no visible key gives 0
    return p @ v
