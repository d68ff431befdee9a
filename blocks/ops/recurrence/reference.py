"""``reference`` backend of ``gated_linear_recurrence``: the definition, one token at a time."""
from __future__ import annotations

import torch

from blocks.ops.recurrence import OP
from blocks.ops.recurrence._common import _initial, _per_head
from composer.core.block import accum_dtype, no_autocast
from composer.core.registry import register_backend


@register_backend(OP, "reference", priority=0)
@no_autocast
def recurrence_reference(q, k, v, log_g=None, state=None, chunk_size: int = 64, A=None):
    """Sequential recurrence, one token at a time: the definition of truth (float64-capable).

    ``chunk_size`` is accepted for a common signature and not used.
    """
    B, T, H, V = v.shape
    K = q.shape[-1]
    acc = accum_dtype(q.dtype)
    q, k = _per_head(q, H).to(acc), _per_head(k, H).to(acc)
    if log_g is None:
        log_g = v.new_zeros(B, T, H, dtype=acc)
    S = _initial(state, (B, H, K, V), acc, q.device)
    out = []
    # unbind, not q[:, t]: the backward of T selects would write T full-size gradients
    for q_t, k_t, v_t, lg_t in zip(q.unbind(1), k.unbind(1), v.to(acc).unbind(1),
                                   log_g.to(acc).unbind(1)):
        if A is not None:                                 # (B, H) -> (B, H, K)
            lg_t = lg_t[..., None] * A.to(acc)
        g_t = lg_t.exp()[..., None] if lg_t.dim() == 3 else lg_t.exp()[..., None, None]
        S = g_t * S + k_t[..., :, None] * v_t[..., None, :]              # (B, H, K, V)
        out.append(torch.einsum("bhkv,bhk->bhv", S, q_t))
    o = torch.stack(out, dim=1) if out else v.new_zeros(B, 0, H, V, dtype=acc)
    return o.to(q.dtype), S.to(q.dtype)
