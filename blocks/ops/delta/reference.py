"""``reference`` backend of ``delta_rule``: the definition, one token at a time."""
from __future__ import annotations

import torch

from blocks.ops.delta import OP
from composer.core.block import accum_dtype, no_autocast
from composer.core.registry import register_backend


@register_backend(OP, "reference", priority=0)
@no_autocast
def delta_reference(q, k, v, b, log_w=None, state=None, *, a=None, chunk_size: int = 64):
    """Sequential recurrence, one token at a time: the definition of truth (float64-capable).

    ``chunk_size`` is accepted for a common signature and not used.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = accum_dtype(q.dtype)
    S = (torch.zeros(B, H, K, V, dtype=acc, device=q.device) if state is None
         else state.to(acc))
    out = []
    steps = lambda x: [None] * T if x is None else x.to(acc).unbind(1)   # noqa: E731
    # unbind, not k[:, t]: the backward of T selects would write T full-size gradients
    for q_t, k_t, v_t, b_t, a_t, lw_t in zip(*(steps(x) for x in (q, k, v, b, a, log_w))):
        a_t = k_t if a_t is None else a_t                                     # (B, H, K)
        b_t = b_t[..., None] * k_t if b.dim() == 3 else b_t
        read = torch.einsum("bhk,bhkv->bhv", a_t, S)                          # a_t^T S_{t-1}
        if lw_t is not None:
            w = lw_t.exp()                                                    # (B, H[, K])
            S = S * (w[..., None, None] if log_w.dim() == 3 else w[..., None])
        S = S + b_t[..., :, None] * read[..., None, :] + k_t[..., :, None] * v_t[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q_t, S))
    o = torch.stack(out, dim=1) if out else v.new_zeros(B, 0, H, V, dtype=acc)
    return o.to(q.dtype), S.to(q.dtype)
