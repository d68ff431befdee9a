"""``step`` backend of ``gated_linear_recurrence``: one decode step (T = 1) in a few PyTorch ops.

Text generation calls the op once per token with T = 1 and the state carried from the last
call. The ``chunked`` backend pays its per-call set-up there (decay matrices, padding to a
chunk, custom autograd functions) for one token; this backend runs the definition directly,

    S = G * S_0 + k v^T        o = S^T q

as a handful of elementwise ops and one matmul, differentiable by autograd. ``auto`` picks it
for every call with T = 1 (its ``accepts`` refuses the others).
"""
from __future__ import annotations

import torch

from blocks.ops.recurrence import OP
from blocks.ops.common import as_dtype, one_token
from composer.core.block import accum_dtype, no_autocast
from composer.core.registry import register_backend



@register_backend(OP, "step", priority=40, accepts=one_token)
@no_autocast
def recurrence_step(q, k, v, log_g=None, state=None, chunk_size: int = 64, A=None):
    """One token (T = 1): S = G * S_0 + k v^T, o = S^T q in plain PyTorch ops (decode).

    Heads sharing q and k (Hk < H) are a (Hk, H / Hk) split of the head dim: q and k are
    broadcast over each group, never copied per head. ``chunk_size`` is accepted for a common
    signature and not used.
    """
    B, _, H, V = v.shape
    Hk, K = q.shape[2:]
    acc = accum_dtype(q.dtype)
    # heads as (B, Hk, H / Hk) where q and k are shared, else (B, H): views (T = 1 drops
    # whatever its stride), and matmul batches 4-d operands with fewer steps than 5-d
    hs = (B, H) if Hk == H else (B, Hk, H // Hk)
    S = as_dtype(k, acc).reshape(hs[:2] + (1,) * (len(hs) - 2) + (K, 1)) \
        * as_dtype(v, acc).reshape(hs + (1, V))                                      # k v^T
    if state is not None:
        S0 = as_dtype(state, acc).reshape(hs + (K, V))
        if log_g is None:
            S = S0 + S
        else:
            lg = as_dtype(log_g, acc)
            if A is not None:                                       # dt * A: (B, 1, H, K)
                lg = lg[..., None] * as_dtype(A, acc)
            S = torch.addcmul(S, lg.exp().reshape(hs + ((K, 1) if lg.dim() == 4 else (1, 1))),
                              S0)
    o = as_dtype(q, acc).reshape(hs[:2] + (1,) * (len(hs) - 1) + (K,)) @ S      # (.., 1, V)
    return as_dtype(o.reshape(B, 1, H, V), q.dtype), as_dtype(S.reshape(B, H, K, V), q.dtype)
