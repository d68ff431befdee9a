"""``step`` backend of ``delta_rule``: one decode step (T = 1) in a few PyTorch ops.

Text generation calls the op once per token with T = 1 and the state carried from the last
call; the ``chunked`` backend's per-call set-up (padding, the triangular solve, custom
autograd functions) is all overhead there. This backend runs the definition directly,

    u = a^T S_0          (the read, before the decay)
    S = diag(w) S_0 + b u^T + k v^T        o = S^T q

as two matmuls and a few elementwise ops, differentiable by autograd. ``auto`` picks it for
every call with T = 1 (its ``accepts`` refuses the others).
"""
from __future__ import annotations

import torch

from blocks.ops.delta import OP
from blocks.ops.common import as_dtype, one_token
from composer.core.block import accum_dtype, no_autocast
from composer.core.registry import register_backend



@register_backend(OP, "step", priority=40, accepts=one_token)
@no_autocast
def delta_step(q, k, v, b, log_w=None, state=None, *, a=None, chunk_size: int = 64):
    """One token (T = 1): S = diag(w) S_0 + b (a^T S_0) + k v^T, o = S^T q in plain ops.

    With ``b`` one number per head (b k: the plain delta rule) both writes share the key k:
    S = diag(w) S_0 + k (v + b u)^T, one outer product. ``chunk_size`` is accepted for a
    common signature and not used.
    """
    B, _, H, K = q.shape
    V = v.shape[-1]
    acc = accum_dtype(q.dtype)
    # T = 1: dropping it is a view whatever the strides
    k = as_dtype(k, acc)
    k_col = k.reshape(B, H, K, 1)
    v_row = as_dtype(v, acc).reshape(B, H, 1, V)
    if state is None:                        # S_0 = 0: nothing to read or decay
        S = k_col * v_row
    else:
        S0 = as_dtype(state, acc)
        read = (k if a is None else as_dtype(a, acc)).reshape(B, H, 1, K) @ S0     # (B, H, 1, V)
        S = S0
        if log_w is not None:
            w = as_dtype(log_w, acc).exp()
            S = S0 * w.reshape((B, H, K, 1) if log_w.dim() == 4 else (B, H, 1, 1))
        if b.dim() == 3:                     # b k: write v + b u along k
            S = torch.addcmul(S, k_col, torch.addcmul(v_row, as_dtype(b, acc).reshape(B, H, 1, 1),
                                                      read))
        else:
            S = torch.addcmul(torch.addcmul(S, as_dtype(b, acc).reshape(B, H, K, 1), read),
                              k_col, v_row)
    o = as_dtype(q, acc).reshape(B, H, 1, K) @ S                                   # (B, H, 1, V)
    return as_dtype(o.reshape(B, 1, H, V), q.dtype), as_dtype(S, q.dtype)
