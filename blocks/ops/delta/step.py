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
from composer.core.block import accum_dtype, no_autocast
from composer.core.registry import register_backend


def _one_step(q, k, v, b, log_w=None, state=None, *, a=None, chunk_size: int = 64):
    """T = 1 (one decode step)"""
    if q.shape[1] != 1:
        return (f"it runs one token per call (T = 1, a decode step); this call has "
                f"T = {q.shape[1]}")
    return None


@register_backend(OP, "step", priority=40, accepts=_one_step)
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
    k = _to(k, acc)
    k_col = k.reshape(B, H, K, 1)
    v_row = _to(v, acc).reshape(B, H, 1, V)
    if state is None:                        # S_0 = 0: nothing to read or decay
        S = k_col * v_row
    else:
        S0 = _to(state, acc)
        read = (k if a is None else _to(a, acc)).reshape(B, H, 1, K) @ S0     # (B, H, 1, V)
        S = S0
        if log_w is not None:
            w = _to(log_w, acc).exp()
            S = S0 * w.reshape((B, H, K, 1) if log_w.dim() == 4 else (B, H, 1, 1))
        if b.dim() == 3:                     # b k: write v + b u along k
            S = torch.addcmul(S, k_col, torch.addcmul(v_row, _to(b, acc).reshape(B, H, 1, 1),
                                                      read))
        else:
            S = torch.addcmul(torch.addcmul(S, _to(b, acc).reshape(B, H, K, 1), read),
                              k_col, v_row)
    o = _to(q, acc).reshape(B, H, 1, K) @ S                                   # (B, H, 1, V)
    return _to(o.reshape(B, 1, H, V), q.dtype), _to(S, q.dtype)


def _to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype``; x itself, without an aten call, where it already is (each call
    counts at one token per step)."""
    return x if x.dtype == dtype else x.to(dtype)
