"""Ops of the linear-recurrence family: ``gated_linear_recurrence`` and ``selective_scan``.

``gated_linear_recurrence`` is the unified view of DESIGN.md. Per batch b and head h, with
state S (K x V):

    S_t = G_t * S_{t-1} + k_t v_t^T          G_t = exp(log_g_t), broadcast over V
    o_t = S_t^T q_t                           (includes the current token)

``log_g`` (all entries <= 0) takes one of three shapes:

* ``None``: G = 1, linear attention (Katharopoulos et al. 2020). For its normaliser
  z_t = sum_{s<=t} k_s, append a column of ones to v: the last output column is q_t . z_t.
* (B, T, H): a scalar per head: RetNet (fixed gamma), Mamba-2 / SSD (Dao & Gu 2024, with
  q = C, k = B, v = dt * x, log g = dt * A).
* (B, T, H, K): a vector over the key dimension: GLA (Yang et al. 2023), RWKV-6 style decays.
  Mamba-1 is this case with one head per channel, K = d_state and V = 1; ``selective_scan``
  below is its fast form.

Shapes: q, k (B, T, Hk, K); v (B, T, H, V); state (B, H, K, V). Hk divides H: head h reads
q and k of head h // (H / Hk), as Mamba-2's groups share B and C (Hk = H: one each).
Returns o (B, T, H, V) and the final state (B, H, K, V) in the dtype of ``q``; both backends
accumulate in float32 (float64 for float64 inputs).

``selective_scan(u, dt, A, B, C, state)`` is the diagonal case written per channel
(h_t = exp(dt_t A) * h_{t-1} + u_t B_t^T, y_t = h_t C_t; Mamba-1, RG-LRU), with a backend of
its own because that shape has no matmul to give: see :func:`scan_chunked`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from composer.block import accum_dtype
from composer.registry import register_backend, register_op

OP = "gated_linear_recurrence"
register_op(OP, "S_t = exp(log_g_t) * S_{t-1} + k_t v_t^T, o_t = S_t^T q_t; log_g None, per head "
                "or per key dim (linear attention, RetNet, GLA, Mamba-2/SSD)")
SCAN = "selective_scan"
register_op(SCAN, "diagonal selective scan: h_t = exp(dt_t A) * h_{t-1} + u_t B_t^T, y_t = h_t C_t "
                  "(Mamba-1 S6, RG-LRU)")

SUB_CHUNK = 8
"""Sub-chunk length of the vector-gate chunked form: the exact decay tensor it materialises
costs SUB_CHUNK * K numbers per token and head."""


def _log_gate(log_g, v: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """log_g as (B, T, H, K') with K' = 1 (none or scalar gates) or K (vector gates)."""
    if log_g is None:
        return v.new_zeros(v.shape[:3] + (1,), dtype=acc)
    return (log_g if log_g.dim() == 4 else log_g[..., None]).to(acc)


def _per_head(x: torch.Tensor, H: int) -> torch.Tensor:
    """q or k (B, T, Hk, K) repeated to H heads (head h reads head h // (H / Hk))."""
    return x if x.shape[2] == H else x.repeat_interleave(H // x.shape[2], dim=2)


def _initial(state, shape, acc, device) -> torch.Tensor:
    return torch.zeros(shape, dtype=acc, device=device) if state is None else state.to(acc)


@register_backend(OP, "reference", priority=0)
def recurrence_reference(q, k, v, log_g=None, state=None, chunk_size: int = 64):
    """Sequential recurrence, one token at a time: the definition of truth (float64-capable).

    ``chunk_size`` is accepted for a common signature and not used.
    """
    B, T, H, V = v.shape
    K = q.shape[-1]
    acc = accum_dtype(q.dtype)
    q, k = _per_head(q, H), _per_head(k, H)
    lg = _log_gate(log_g, v, acc)                                          # (B, T, H, K')
    S = _initial(state, (B, H, K, V), acc, q.device)
    out = []
    for t in range(T):
        kv = k[:, t].to(acc)[..., :, None] * v[:, t].to(acc)[..., None, :]    # (B, H, K, V)
        S = lg[:, t].exp()[..., None] * S + kv
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t].to(acc)))
    o = torch.stack(out, dim=1) if out else v.new_zeros(B, 0, H, V, dtype=acc)
    return o.to(q.dtype), S.to(q.dtype)


@register_backend(OP, "chunked", priority=10)
def recurrence_chunked(q, k, v, log_g=None, state=None, chunk_size: int = 64):
    """Chunkwise-parallel form: matmuls inside chunks of ``chunk_size``, recurrence across.

    With l_s = log g_s, S_0 the state entering a chunk and sums over positions in the chunk
    (per key dim for vector gates):

        o_i = (q_i * exp(sum_{s<=i} l_s))^T S_0
              + sum_{j<=i} (sum_k q_ik k_jk exp(sum_{j<s<=i} l_sk)) v_j
        S_C = exp(sum_s l_s) * S_0 + sum_j (k_j * exp(sum_{s>j} l_s)) v_j^T

    Every exponent is a sum of log-gates (<= 0), so nothing overflows for any gate, and each
    is summed directly rather than as a difference of prefix sums: gradients stay exact to
    rounding even where exp(...) is tiny (log g = -30 per step), instead of being the rounding
    left when two large prefix sums cancel. Scalar gates give a (C x C) decay matrix per head,
    and q k^T is computed once per group of heads sharing q and k; vector gates use the
    secondary chunking of Yang et al. 2023 (GLA, section 4.2), see :func:`_intra_vector`.
    """
    B, T, H, V = v.shape
    Hk, K = q.shape[2:]
    acc = accum_dtype(q.dtype)
    S = _initial(state, (B, H, K, V), acc, q.device)
    if T == 0:
        return v.new_zeros(B, 0, H, V, dtype=q.dtype), S.to(q.dtype)
    vector = log_g is not None and log_g.dim() == 4
    C = max(1, min(chunk_size, T))
    c = min(SUB_CHUNK, C)
    if vector:                                    # q, k per head; whole sub-chunks per chunk
        q, k, Hk = _per_head(q, H), _per_head(k, H), H
        C = -(-C // c) * c
    n = -(-T // C)
    pad = n * C - T

    def prep(x):   # (B, T, h, X) -> (B, Hk, h / Hk, n, C, X); padded tokens: k = v = 0, l = 0
        x = F.pad(x.to(acc).transpose(1, 2), (0, 0, 0, pad))
        return x.reshape(B, Hk, -1, n, C, x.shape[-1])

    qc, kc, vc = prep(q), prep(k), prep(v)                 # q, k: (B, Hk, 1, n, C, K)
    lg = prep(_log_gate(log_g, v, acc))                    # (B, Hk, H / Hk, n, C, K')
    if vector:
        o = _intra_vector(qc, kc, vc, lg, c)
    else:
        decay = segsum(lg)[..., 0].exp()                                   # (.., n, C, C)
        o = ((qc @ kc.transpose(-1, -2)) * decay) @ vc                     # (.., n, C, V)
    chunk_states = (kc * suffix_sum(lg).exp()).transpose(-1, -2) @ vc      # (.., n, K, V)
    chunk_decay = lg.sum(-2, keepdim=True).transpose(-1, -2).exp()         # (.., n, K', 1)
    S = S.reshape(B, Hk, H // Hk, K, V)
    entering = []
    for decay, added in zip(chunk_decay.unbind(3), chunk_states.unbind(3)):   # across chunks
        entering.append(S)
        S = decay * S + added
    o = o + (qc * lg.cumsum(-2).exp()) @ torch.stack(entering, dim=3)       # inter-chunk
    o = o.reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)
    return o.to(q.dtype), S.reshape(B, H, K, V).to(q.dtype)


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Segment sums over positions: x (..., L, X) -> (..., L, L, X) with
    [i, j] = sum_{j < s <= i} x_s for j <= i (0 on the diagonal) and -inf above it.

    Each entry is a cumulative sum of the terms it contains, never a difference of prefix sums.
    """
    L = x.shape[-2]
    ones = torch.ones(L, L, dtype=torch.bool, device=x.device)
    terms = x[..., :, None, :].expand(*x.shape[:-1], L, x.shape[-1])       # [s, j] = x_s
    terms = terms.masked_fill(~ones.tril(-1)[..., None], 0)                # keep s > j
    return terms.cumsum(-3).masked_fill(~ones.tril()[..., None], float("-inf"))


def suffix_sum(x: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """sum_{s > j} x_s along ``dim`` (0 at the last position)."""
    tail = x.narrow(dim, 1, x.shape[dim] - 1).flip(dim).cumsum(dim).flip(dim)
    return torch.cat([tail, torch.zeros_like(x.narrow(dim, 0, 1))], dim)


def _intra_vector(q, k, v, lg, c: int) -> torch.Tensor:
    """Intra-chunk part sum_{j<=i} (sum_k q_ik k_jk exp(sum_{j<s<=i} l_sk)) v_j, vector gates.

    q, k, lg: (..., C, K); v: (..., C, V); C a multiple of ``c``. Returns (..., C, V).
    The chunk is cut into sub-chunks of c tokens. Inside a sub-chunk the decay is materialised
    exactly, (c, c, K). For i in sub-chunk I and j in an earlier sub-chunk J the exponent splits
    at the boundary of I into sum_{s in I, s<=i} l_s (a query factor) plus
    sum_{j<s<start(I)} l_s (a key factor per I), both <= 0, which makes the rest two matmuls.
    """
    C, K = q.shape[-2:]
    ns = C // c
    qs, ks, ls, vs = (x.unflatten(-2, (ns, c)) for x in (q, k, lg, v))    # (..., ns, c, X)
    # exact decays inside sub-chunks, segment sums as one matmul with a 0/1 matrix:
    # seg[k, i, j] = sum_s l_sk [j < s <= i]
    s_, i_, j_ = (torch.arange(c, device=q.device).view(shape) for shape in
                  ((c, 1, 1), (1, c, 1), (1, 1, c)))
    between_ij = ((j_ < s_) & (s_ <= i_)).to(q.dtype).view(c, c * c)
    seg = (ls.transpose(-1, -2) @ between_ij).unflatten(-1, (c, c))       # (..., ns, K, c, c)
    qt, kt = qs.transpose(-1, -2), ks.transpose(-1, -2)                    # (..., ns, K, c)
    A = (seg.exp() * qt[..., :, None] * kt[..., None, :]).sum(-3)         # (..., ns, c, c)
    A = A * (j_ <= i_)[0]                                                  # causal
    o = (A @ vs).flatten(-3, -2)                                           # (..., C, V)
    if ns == 1:
        return o
    qr = qs * ls.cumsum(-2).exp()                                          # (..., ns, c, K)
    # [I, J] = sum of the sub-chunks strictly between J and I; -inf unless J < I
    between = segsum(ls.sum(-2))                                           # (..., ns, ns, K)
    between = F.pad(between[..., :-1, :, :], (0, 0, 0, 0, 1, 0), value=float("-inf"))
    kr = (between[..., None, :] + suffix_sum(ls)[..., None, :, :, :]).flatten(-3, -2)
    kr = kr.exp() * k[..., None, :, :]                                     # (..., ns, C, K)
    scores = (qr @ kr.transpose(-1, -2)).flatten(-3, -2)                   # (..., C, C)
    return o + scores @ v


# --------------------------------------------------------------------------------------------
# selective_scan: the diagonal (one head per channel, V = 1) shape of the vector-gate case
# --------------------------------------------------------------------------------------------
@register_backend(SCAN, "reference", priority=0)
def scan_reference(u, dt, A, Bm, Cm, state=None, chunk_size: int = 64):
    """Mamba-1's selective scan (Gu & Dao 2023, Algorithm 2), one token at a time.

        h_t = exp(dt_t A) * h_{t-1} + u_t B_t^T        h: (D, N) per sequence
        y_t = h_t C_t

    Mamba passes u = dt * x (its discretised input); RG-LRU passes N = 1, A = -1, B = C = 1.
    It is ``gated_linear_recurrence`` with H = D heads, K = N, V = 1, q = C, k = B, v = u and
    log g = dt * A (B and C shared by every channel).
    Shapes: u, dt (B, T, D); A (D, N), <= 0; Bm, Cm (B, T, N); state (B, D, N).
    Returns y (B, T, D) and the final state (B, D, N) in the dtype of ``u``.
    """
    Bsz, T, D = u.shape
    dtype, acc = u.dtype, accum_dtype(u.dtype)
    u, dt, A, Bm, Cm = (t.to(acc) for t in (u, dt, A, Bm, Cm))
    h = _initial(state, (Bsz, D, A.shape[-1]), acc, u.device)
    out = []
    for t in range(T):
        h = (dt[:, t, :, None] * A).exp() * h + u[:, t, :, None] * Bm[:, t, None]
        out.append((h * Cm[:, t, None]).sum(-1))
    y = torch.stack(out, dim=1) if out else u.new_zeros(Bsz, 0, D)
    return y.to(dtype), h.to(dtype)


@register_backend(SCAN, "chunked", priority=10)
def scan_chunked(u, dt, A, Bm, Cm, state=None, chunk_size: int = 64):
    """Chunk-parallel selective scan: ~T / chunk_size + chunk_size Python steps per pass.

    Why not the matmul form of ``gated_linear_recurrence``: with V = 1 and a decay per (channel,
    state) pair there is nothing to multiply as matrices; its intra-chunk term
    sum_j (sum_n C_in B_jn exp(A_n sum_{j<s<=i} dt_s)) u_j costs a (C, C, N) decay tensor
    per channel, C times the recurrence itself. Here the recurrence stays elementwise and runs
    on all chunks at once instead, and the backward pass is the same scan run backwards in time
    over the adjoint (:class:`_SelectiveScan`), so autograd keeps one (T, D, N) tensor of
    states per call instead of a graph of per-step temporaries.
    """
    Bsz, T, D = u.shape
    acc = accum_dtype(u.dtype)
    h0 = _initial(state, (Bsz, D, A.shape[-1]), acc, u.device)
    if T == 0:
        return u.new_zeros(Bsz, 0, D), h0.to(u.dtype)
    y, h = _SelectiveScan.apply(u.to(acc), dt.to(acc), A.to(acc), Bm.to(acc), Cm.to(acc), h0,
                                max(1, min(chunk_size, T)))
    return y.to(u.dtype), h.to(u.dtype)


def _steps(t: torch.Tensor, L: int) -> torch.Tensor:
    """(B, T, X) -> step-major (L, B, n, X), zero-padded: [l, :, c] is token c * L + l."""
    B, T = t.shape[:2]
    n = -(-T // L)
    return F.pad(t, (0, 0, 0, n * L - T)).view(B, n, L, -1).permute(2, 0, 1, 3)


def _unsteps(t: torch.Tensor, T: int) -> torch.Tensor:
    """Step-major (L, B, n, X) -> (B, T, X)."""
    L, B, n = t.shape[:3]
    return t.permute(1, 2, 0, 3).reshape(B, n * L, -1)[:, :T]


def _entering(dt, A, u, Bm, h0):
    """States entering each chunk of h_t = exp(dt_t A) * h_{t-1} + u_t B_t^T, and the last one.

    dt, u: (L, B, n, D) and Bm: (L, B, n, N), step-major; A (D, N); h0 (B, D, N).
    Each chunk's own contribution sum_j exp(A sum_{s>j} dt_s) * u_j B_j^T (exponents <= 0) is
    summed one step at a time over all chunks at once; one loop over chunks then carries h.
    Returns (B, n, D, N) and (B, D, N).
    """
    own = torch.zeros_like(h0[:, None]).expand(-1, dt.shape[2], -1, -1).clone()  # (B,n,D,N)
    for dt_s, u_s, B_s in zip(suffix_sum(dt, 0).unbind(0), u.unbind(0), Bm.unbind(0)):
        own.addcmul_((dt_s[..., None] * A).exp(), u_s[..., None] * B_s[..., None, :])
    total = (dt.sum(0)[..., None] * A).exp()                               # (B, n, D, N)
    entering, h = [], h0
    for decay, added in zip(total.unbind(1), own.unbind(1)):
        entering.append(h)
        h = decay * h + added
    return torch.stack(entering, dim=1), h


class _SelectiveScan(torch.autograd.Function):
    """The selective scan with a hand-written backward (inputs already in the working dtype).

    Forward: :func:`_entering`, then one loop over the steps of all chunks at once, keeping the
    states (L, B, n, D, N) for the backward. With a_t = exp(dt_t A) and g_t = dL/dh_t the
    adjoint runs backwards in time, g_t = dy_t C_t^T + a_{t+1} * g_{t+1} (g_T adds dL/dh_T),
    chunk-parallel the same way; each step then gives dL/du_t = g_t B_t, dL/dB_t = g_t^T u_t,
    dL/dC_t = h_t^T dy_t and dL/d(log a_t) = g_t * h_{t-1} * a_t while g_t is in cache.
    """

    @staticmethod
    def forward(ctx, u, dt, A, Bm, Cm, h0, L):
        T = u.shape[1]
        dts, us, Bs, Cs = (_steps(t, L) for t in (dt, u, Bm, Cm))
        hc, h = _entering(dts, A, us, Bs, h0)
        H = dts.new_empty(dts.shape + A.shape[-1:])                       # (L, B, n, D, N)
        ys = []
        for l in range(L):
            hc = torch.addcmul(us[l][..., None] * Bs[l][..., None, :],
                               (dts[l][..., None] * A).exp(), hc, out=H[l])
            ys.append((hc @ Cs[l][..., None])[..., 0])                     # (B, n, D)
        ctx.save_for_backward(u, dt, A, Bm, Cm, h0, H)
        ctx.L = L
        return _unsteps(torch.stack(ys), T), h

    @staticmethod
    def backward(ctx, dy, dh):
        u, dt, A, Bm, Cm, h0, H = ctx.saved_tensors
        L, T = ctx.L, u.shape[1]
        dh = torch.zeros_like(h0) if dh is None else dh
        dy = torch.zeros_like(u) if dy is None else dy
        dts, us, Bs, Cs, dys = (_steps(t, L) for t in (dt, u, Bm, Cm, dy))
        # adjoint arriving at each chunk's last step from the future, lam = a_{t+1} g_{t+1}:
        # g at a chunk's first step is sum_l exp(A sum_{1<=s<=l} dt_s) dy_l C_l^T + through * lam
        pre = torch.cat([torch.zeros_like(dts[:1]), dts[1:]]).cumsum(0)   # (L, B, n, D)
        own = torch.zeros_like(H[0])
        for pre_l, dy_l, C_l in zip(pre.unbind(0), dys.unbind(0), Cs.unbind(0)):
            own.addcmul_((pre_l[..., None] * A).exp(), dy_l[..., None] * C_l[..., None, :])
        through = (pre[-1][..., None] * A).exp()
        first_a = (dts[0][..., None] * A).exp()                            # a at step 0
        lams, lam = [], dh
        for c in reversed(range(dts.shape[2])):
            lams.append(lam)
            lam = first_a[:, c] * (own[:, c] + through[:, c] * lam)
        carry = torch.stack(lams[::-1], dim=1)                             # (B, n, D, N)
        before = torch.cat([h0[:, None], H[-1, :, :-1]], dim=1)            # h before step 0
        d_u, d_dt, d_B, d_C = [], [], [], []
        d_A = torch.zeros_like(A)
        for l in reversed(range(L)):
            g = torch.addcmul(carry, dys[l][..., None], Cs[l][..., None, :])   # g_t
            a = (dts[l][..., None] * A).exp()
            z = g * (H[l - 1] if l else before) * a                       # dL/d(log a_t)
            d_u.append((g @ Bs[l][..., None])[..., 0])
            d_B.append((us[l][..., None, :] @ g)[..., 0, :])
            d_C.append((dys[l][..., None, :] @ H[l])[..., 0, :])
            d_dt.append((z * A).sum(-1))
            d_A += (z * dts[l][..., None]).sum((0, 1))
            carry = a * g
        grads = (_unsteps(torch.stack(d[::-1]), T) for d in (d_u, d_dt, d_B, d_C))
        d_u, d_dt, d_B, d_C = grads
        return d_u, d_dt, d_A, d_B, d_C, carry[:, 0], None
