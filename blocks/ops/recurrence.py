"""Op ``gated_linear_recurrence``: the unified linear-recurrence view (DESIGN.md).

Per batch b and head h, with state S (K x V):

    S_t = g_t * S_{t-1} + k_t v_t^T        g_t = exp(log_g_t), scalar per head
    o_t = S_t^T q_t                         (includes the current token)

G = 1 is linear attention, fixed g is RetNet, data-dependent g is Mamba-2 / SSD (Dao & Gu 2024,
"Transformers are SSMs", with q = C, k = B, v = dt * x, log g = dt * A).

Shapes: q, k (B, T, H, K); v (B, T, H, V); log_g (B, T, H), <= 0; state (B, H, K, V).
Returns o (B, T, H, V) and the final state (B, H, K, V), both in the dtype of ``q``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from composer.registry import register_backend, register_op

OP = "gated_linear_recurrence"
register_op(OP, "S_t = exp(log_g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t "
                "(linear attention, RetNet, Mamba-2/SSD)")


@register_backend(OP, "reference", priority=0)
def recurrence_reference(q, k, v, log_g, state=None, chunk_size: int = 64):
    """Sequential recurrence, one token at a time: the definition of truth (float64-capable).

    ``chunk_size`` is accepted for a common signature and not used.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = (torch.zeros(B, H, K, V, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype,
                     device=q.device) if state is None else state.to(
        torch.float64 if q.dtype == torch.float64 else torch.float32))
    acc = S.dtype
    out = []
    for t in range(T):
        g = log_g[:, t].to(acc).exp()[..., None, None]                     # (B, H, 1, 1)
        S = g * S + k[:, t].to(acc)[..., :, None] * v[:, t].to(acc)[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t].to(acc)))
    o = torch.stack(out, dim=1) if out else v.new_zeros(B, 0, H, V, dtype=acc)
    return o.to(q.dtype), S.to(q.dtype)


@register_backend(OP, "chunked", priority=10)
def recurrence_chunked(q, k, v, log_g, state=None, chunk_size: int = 64):
    """Chunkwise-parallel form: matmuls inside chunks of ``chunk_size``, recurrence across.

    With b_i = sum_{s<=i} log g_s inside a chunk (cumulative log-gate) and S_0 the state
    entering the chunk:
        o_i = exp(b_i) S_0^T q_i + sum_{j<=i} exp(b_i - b_j) (q_i . k_j) v_j
        S_C = exp(b_C) S_0 + sum_j exp(b_C - b_j) k_j v_j^T
    Every exponent is <= 0 (masked before exp), so nothing overflows for any gate.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = max(1, min(chunk_size, T))
    n = -(-T // C)
    pad = n * C - T
    # (B, H, n, C, .) layout; padded tokens have k = v = 0 and log g = 0: they change nothing
    def prep(x):
        x = x.to(acc).transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(B, H, n, C, *x.shape[3:])
    qc, kc, vc = prep(q), prep(k), prep(v)
    b = prep(log_g).cumsum(-1)                                            # (B, H, n, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf"))
    decay = diff.exp()                                                    # (B, H, n, C, C)
    scores = (qc @ kc.transpose(-1, -2)) * decay
    o = scores @ vc                                                       # intra-chunk
    # state contribution of each chunk: sum_j exp(b_C - b_j) k_j v_j^T
    w = (b[..., -1:] - b).exp()                                           # (B, H, n, C)
    chunk_states = (kc * w[..., None]).transpose(-1, -2) @ vc             # (B, H, n, K, V)
    chunk_decay = b[..., -1].exp()                                        # (B, H, n)
    S = (torch.zeros(B, H, K, V, dtype=acc, device=q.device) if state is None
         else state.to(acc))
    entering = []
    for c in range(n):                                                    # recurrence across
        entering.append(S)
        S = chunk_decay[:, :, c, None, None] * S + chunk_states[:, :, c]
    S0 = torch.stack(entering, dim=2)                                     # (B, H, n, K, V)
    o = o + (qc * b.exp()[..., None]) @ S0                                # inter-chunk
    o = o.reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)
    return o.to(q.dtype), S.to(q.dtype)
