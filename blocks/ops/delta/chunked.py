"""``chunked`` backend of ``delta_rule``: a triangular solve and a few matmuls per chunk,
one K x K by K x V matmul per chunk across chunks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blocks.ops.common import LOG2E, bmm, bmm_add, excl_cumsum, heads_first, rcumsum
from blocks.ops.delta import OP
from composer.core.block import accum_dtype, no_autocast
from composer.core.registry import register_backend

SUB = 16
"""Sub-chunk length for per-channel decay (see ``_pairs``)."""
SPAN = 40.0
"""Largest decay range, -sum log w, inside one sub-chunk that the factorised form takes
(exp(40) ~ 2e17: far from overflow, even in float32)."""
PREFIX_SPAN = 40.0
"""Largest decay range, -sum log w, of any chunk for which a call takes the decays between
positions, exp(Lam_i - Lam_j), from prefix sums Lam in the compute dtype: each rounding of
Lam is then at most 2^-24 * 40 in float32. A call with a chunk decaying further (an early
decay near 0 makes every later Lam large, and their differences lose all digits: ulp(1e4)
~ 1e-3 in float32) takes Lam in float64 (see :func:`_prefix_sums`)."""
LOG_W_FLOOR = -1000.0
"""Floor on each log decay where the prefix sums are float64: exp(-1000) is 0 in float32 and
float64 alike, so every decay across a floored step stays exactly 0, and no -inf (or -1e30)
swamps the sums or makes -inf - -inf."""


def _prefix_sums(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lw, Lam) for log decays lw (..., C, Kd): Lam_i = sum_{s<=i} lw_s along the chunk, in
    lw's dtype where every chunk decays at most PREFIX_SPAN (settled by the chunk totals
    Lam_C: lw <= 0, so |Lam_i| <= |Lam_C|), else lw floored at LOG_W_FLOOR (a new tensor, in
    its own dtype) and Lam in float64, whose roundings at |Lam| <= 1000 C (7e-12 for C = 64)
    leave every difference exact to float32. Sums of log decays taken directly (the suffix
    sums) and exp(Lam) itself (rounding Lam costs at most 2^-24 / e absolute) need only lw's
    dtype."""
    Lam = lw.cumsum(-2)
    if not Lam.numel() or bool(Lam[..., -1, :].min() >= -PREFIX_SPAN):    # NaN: float64
        return lw, Lam
    lw = lw.clamp_min(LOG_W_FLOOR)
    return lw, lw.to(torch.float64).cumsum(-2)


def _pairs(x_rows, y_cols, L_rows, Lam, strict_rows: int):
    """Decayed inner products of every row vector with every earlier column vector.

    x_rows (..., R, C, K) stacks R kinds of row vectors (reads and queries), y_cols
    (..., P, C, K) P kinds of column vectors (write keys); Lam (..., C, Kd) is the cumulative
    log-decay (Kd = 1: one decay per head, Kd = K: per channel) and L_rows (..., R, C, Kd) the
    rows' own: Lam_{i-1} for the first ``strict_rows`` kinds, Lam_i for the rest. With lag
    o_r = 1 or 0 for those, returns (..., R, P, C, C):

        out[r, p, i, j] = sum_k x_r[i, k] y_p[j, k] exp(L_r[i, k] - Lam[j, k])    j <= i - o_r

    else 0. Every exponent taken is <= 0, so any decay, however close to 0, neither overflows
    nor gives NaN. Lam and L_rows may be float64 (:func:`_prefix_sums`): each exponent is a
    difference taken in their dtype, then rounded to x's. The pairs j = i - o_r have exponent
    0 whatever the decays: they are plain dot products here, so that no gradient reaches the
    decays through them (it would cancel only up to rounding, drowning the true, tiny
    gradients of decays near 0).
    """
    C = Lam.shape[-2]
    R, P = x_rows.shape[-3], y_cols.shape[-3]
    dt = x_rows.dtype
    lags = [1 if r < strict_rows else 0 for r in range(R)]
    idx = torch.arange(C, device=Lam.device)
    decayed = torch.stack([idx[None, :] < idx[:, None] - o for o in lags])      # (R, C, C)
    unit = torch.stack([idx[None, :] == idx[:, None] - o for o in lags])        # (R, C, C)
    if Lam.shape[-1] == 1:                       # one decay per head: it leaves the K-sum
        diff = (L_rows[..., 0][..., :, :, None]
                - Lam[..., 0][..., None, None, :]).to(dt)                       # (.., R, C, C)
        decay = diff.masked_fill(~decayed, float("-inf")).exp() + unit.to(diff.dtype)
        xy = x_rows.flatten(-3, -2) @ y_cols.flatten(-3, -2).transpose(-1, -2)  # (.., RC, PC)
        xy = xy.unflatten(-1, (P, C)).unflatten(-3, (R, C)).transpose(-3, -2)  # (..,R,P,C,C)
        return xy * decay[..., :, None, :, :]
    # per-channel decay: sub-chunks of length s, m = C / s of them. Each pair factors through
    # ref_I, the cumulative decay just before the row's sub-chunk I: x_i exp(L_i - ref_I) (an
    # exponent <= 0) times y_j exp(ref_I - Lam_j). For j in an earlier sub-chunk that exponent
    # is <= 0 too; for j inside sub-chunk I it is at most the sub-chunk's decay range, so the
    # same matmul covers the diagonal blocks when every range is below SPAN. Otherwise
    # (decays near 0) the diagonal blocks take their explicit (s, s, K) decays. ref cancels
    # from every product, so no gradient flows through it.
    s = min(SUB, C)
    m = C // s
    K = x_rows.shape[-1]
    sh = x_rows.shape[:-3]
    ref = F.pad(Lam.detach(), (0, 0, 1, 0))[..., :C:s, :]                      # (.., m, K)
    end = Lam.detach()[..., s - 1::s, :]                     # Lam at each sub-chunk's end
    xs = x_rows.reshape(*sh, R, m, s, K)
    Ls = L_rows.reshape(*sh, R, m, s, K)
    x_hat = xs * (Ls - ref[..., None, :, None, :]).to(dt).exp()                 # (..,R,m,s,K)
    narrow = bool((ref - end).max() <= SPAN)
    upto = (torch.arange(m, device=Lam.device) + int(narrow)) * s
    # for j in sub-chunk J, ref_I - Lam_j = (ref_I - end_J) + (end_J - Lam_j): for J < I two
    # sums of log decays (<= 0: no cancellation), each rounded to x's dtype alone
    blk = (ref[..., :, None, :] - end[..., None, :, :]).to(dt)                  # (.., m, m, K)
    tail = (end[..., :, None, :] - Lam.unflatten(-2, (m, s))).to(dt)            # (.., m, s, K)
    e = (blk[..., None, :] + tail[..., None, :, :, :]).flatten(-3, -2).masked_fill(
        ~(idx[None, :] < upto[:, None])[..., None], float("-inf")).exp()        # (.., m, C, K)
    y_hat = (y_cols[..., :, None, :, :] * e[..., None, :, :, :]).transpose(-4, -3)
    out = x_hat.transpose(-4, -3).flatten(-3, -2) @ y_hat.flatten(-3, -2).transpose(-1, -2)
    out = out.unflatten(-1, (P, C)).unflatten(-3, (R, s)).permute(
        *range(len(sh)), -4, -2, -5, -3, -1).reshape(*sh, R, P, C, C)
    out = out.masked_fill(~decayed[:, None], 0.0) + torch.stack([torch.diag_embed(
        (x_rows[..., r, None, o:, :] * y_cols[..., :C - o, :]).sum(-1), offset=-o)
        for r, o in enumerate(lags)], -4)                                       # unit pairs
    if narrow:
        return out
    ys = y_cols.reshape(*sh, P, m, s, K)
    Lc = Lam.reshape(*sh, m, s, K)
    # the diagonal blocks' decays exp(Lam_i - Lam_j), j < i, made once: a row with lag o
    # (L = Lam_{i-o}) reads row i - o of them, its first o rows have no pairs
    below = torch.ones(s, s, dtype=torch.bool, device=Lam.device).tril(-1)
    dd = (Lc[..., :, :, None, :] - Lc[..., :, None, :, :]).to(dt).masked_fill(
        ~below[..., None], float("-inf")).exp()                                 # (.., m, s, s, K)
    diag = torch.stack([F.pad(torch.einsum("...mik,...pmjk,...mijk->...pmij",
                                           xs[..., r, :, o:, :], ys, dd[..., :s - o, :, :]),
                              (0, 0, o, 0)) for r, o in enumerate(lags)], -5)   # (..,R,P,m,s,s)
    blocks = torch.diag_embed(diag.movedim(-3, -1))                             # (..,s,s,m,m)
    return out + blocks.movedim(-2, -4).transpose(-1, -2).reshape(*sh, R, P, C, C)


def _solve_unit_lower(L: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(I - L)^{-1} rhs for strictly lower-triangular L (..., C, C), rhs (..., C, n)."""
    return _UnitLowerSolve.apply(L, rhs)


class _UnitLowerSolve(torch.autograd.Function):
    """X = (I - L)^{-1} R through the explicit inverse, so that the backward is two matmuls,
    dR = (I - L)^{-T} dX and dL = lower(dR X^T), instead of a second triangular solve; the
    inverse (a solve against I) and one product also take less time than LAPACK's solve."""

    @staticmethod
    def forward(ctx, L, R):
        C = L.shape[-1]
        eye = torch.eye(C, dtype=L.dtype, device=L.device).expand(L.shape)
        inv = torch.linalg.solve_triangular(-L, eye, upper=False, unitriangular=True)
        X = inv @ R
        ctx.save_for_backward(inv, X)
        return X

    @staticmethod
    @no_autocast
    def backward(ctx, dX):
        inv, X = ctx.saved_tensors
        dR = inv.transpose(-1, -2) @ dX
        dL = (dR @ X.transpose(-1, -2)).tril_(-1) if ctx.needs_input_grad[0] else None
        return dL, dR


@register_backend(OP, "chunked", priority=10)
@no_autocast
def delta_chunked(q, k, v, b, log_w=None, state=None, *, a=None, chunk_size: int = 64):
    """Chunkwise-parallel form: one triangular solve and a few matmuls per chunk, and across
    chunks one K x K by K x V matmul each.

    Inside a chunk with entering state S_0 and cumulative log-decay Lam_i = sum_{s<=i} log w_s,
    the reads u_i = a_i^T S_{i-1} turn the recurrence into a gated linear one with two writes
    per token, S_i = diag(w_i) S_{i-1} + b_i u_i^T + k_i v_i^T. Unrolling it,

        u = A_ab u + A_ak v + (a * exp(Lam_{i-1})) S_0        (A_xy strictly lower, see _pairs)
        o = A_qb u + A_qk v + (q * exp(Lam_i)) S_0            (A_qy lower with the diagonal)

    so u = W S_0 + U with [W, U] = (I - A_ab)^{-1} [a * exp(Lam_{i-1}), A_ak v] (the UT
    transform of Yang et al. 2024, one unit-triangular solve per chunk), and the chunk acts on
    the state affinely: S_C = M S_0 + N with, for E = exp(Lam_C - Lam),
    M = diag(exp(Lam_C)) + (b E)^T W and N = (b E)^T U + (k E)^T v. Only S <- M S + N runs
    sequentially; the outputs are one batched matmul with the stacked entering states.
    With a = k and b = beta k (beta one number per token) both writes share the key k, with
    value z = beta u + v, so only A_kk and A_qk are needed; with one decay per head (or none)
    that case runs :class:`_PlainDelta`, the same products with a hand-written backward
    (DeltaNet, Gated DeltaNet). The decays between positions are differences of prefix sums,
    float32 ones only in calls whose chunks all decay at most PREFIX_SPAN (see
    :func:`_prefix_sums`), so every decay keeps float32 precision, however strong the decays
    before it.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = accum_dtype(q.dtype)
    C = max(1, min(chunk_size, T))
    if log_w is not None and log_w.dim() == 4 and C > SUB:
        C = -(-C // SUB) * SUB                   # whole sub-chunks
    n = -(-T // C)
    pad = n * C - T

    # (B, H, n, C, .) layout; padded tokens have k = v = a = b = 0 and log w = 0: they change
    # nothing
    def prep(x):
        x = heads_first(x if x.dim() == 4 else x[..., None], acc, pad)
        return x.reshape(B, H, n, C, x.shape[-1])

    qc, kc, vc, bc = prep(q), prep(k), prep(v), prep(b)
    lw = (prep(log_w) if log_w is not None
          else torch.zeros(B, H, n, C, 1, dtype=acc, device=q.device))
    if a is None and b.dim() == 3 and (log_w is None or log_w.dim() == 3):
        S_in = (torch.zeros(B, H, K, V, dtype=acc, device=q.device) if state is None
                else state.to(acc))
        o, S = _PlainDelta.apply(qc, kc, vc, bc, None if log_w is None else lw, S_in)
        o = o.reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)
        return o.to(q.dtype), S.to(q.dtype)
    lw, Lam = _prefix_sums(lw)               # (B, H, n, C, Kd); float64 if a chunk decays far
    Lam_prev = F.pad(Lam, (0, 0, 1, 0))[..., :C, :]                      # Lam_{i-1}, exact
    g, g_prev = Lam.to(acc).exp(), Lam_prev.to(acc).exp()
    # decay from each token to the chunk's end, summed directly (no Lam_C - Lam_j cancellation)
    E = F.pad(rcumsum(lw)[..., 1:, :], (0, 0, 0, 1)).exp()
    if a is None and b.dim() == 3:               # plain delta rule: one write key, k
        A = _pairs(torch.stack([kc, qc], -3), kc[..., None, :, :],
                   torch.stack([Lam_prev, Lam], -3), Lam, strict_rows=1)  # (B,H,n,2,1,C,C)
        A_kk, A_qk = A.squeeze(-3).unbind(-3)             # unbind: no whole-size zero grads
        WU = _solve_unit_lower(A_kk * bc.transpose(-1, -2),                # [W | U]
                               torch.cat([kc * g_prev, A_kk @ vc], -1))
        WZ = bc * WU + F.pad(vc, (K, 0))                # z = W_z S_0 + Z, stored as [W_z | Z]
        read = A_qk @ WZ                                                 # (B, H, n, C, K+V)
        read_q, o_local = read.split([K, V], -1)
        q_read = qc * g + read_q
        MN = (kc * E).transpose(-1, -2) @ WZ                             # (B, H, n, K, K+V)
        M, N = MN.split([K, V], -1)
    else:
        ac = kc if a is None else prep(a)
        bc = bc * kc if b.dim() == 3 else bc
        A = _pairs(torch.stack([ac, qc], -3), torch.stack([bc, kc], -3),
                   torch.stack([Lam_prev, Lam], -3), Lam, strict_rows=1)  # (B,H,n,2,2,C,C)
        (A_ab, A_ak), (A_qb, A_qk) = (row.unbind(-3) for row in A.unbind(-4))
        WU = _solve_unit_lower(A_ab, torch.cat([ac * g_prev, A_ak @ vc], -1))  # [W | U]
        read = A_qb @ WU                                                 # [A_qb W | A_qb U]
        read_q, read_u = read.split([K, V], -1)
        q_read, o_local = qc * g + read_q, read_u + A_qk @ vc
        MN = (bc * E).transpose(-1, -2) @ WU                             # (B, H, n, K, K+V)
        M, N = MN.split([K, V], -1)
        N = N + (kc * E).transpose(-1, -2) @ vc
    M = M + torch.diag_embed(g[..., -1, :].expand(B, H, n, K))          # (B, H, n, K, K)
    S = (torch.zeros(B * H, K, V, dtype=acc, device=q.device) if state is None
         else state.to(acc).reshape(B * H, K, V))
    entering = []
    for M_c, N_c in zip(M.permute(2, 0, 1, 3, 4).reshape(n, B * H, K, K).unbind(0),
                        N.permute(2, 0, 1, 3, 4).reshape(n, B * H, K, V).unbind(0)):
        entering.append(S)                                               # recurrence across
        S = torch.baddbmm(N_c, M_c, S)
    S0 = torch.stack(entering, 1).view(B, H, n, K, V)
    o = q_read @ S0 + o_local                                            # (B, H, n, C, V)
    o = o.reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)
    return o.to(q.dtype), S.view(B, H, K, V).to(q.dtype)


class _PlainDelta(torch.autograd.Function):
    """The plain delta rule (a = k, b_t = beta_t k_t) with one decay per head or none: the
    chunked form of :func:`delta_chunked` with its backward written by hand.

    q, k (B, H, n, C, K); v (B, H, n, C, V); b, lw (B, H, n, C, 1), lw None for no decay;
    S_in (B, H, K, V). Per chunk, with Lam the prefix sums of lw, g = exp(Lam),
    g' = exp(Lam_{i-1}), E_j = exp(sum_{s>j} lw_s) and the pair matrices
    A_k[i, j] = k_i . k_j exp(Lam_{i-1} - Lam_j) (j < i) and A_q[i, j] = q_i . k_j
    exp(Lam_i - Lam_j) (j <= i), the pairs j = i - 1 of A_k and j = i of A_q plain dot products:

        [W | U] = (I - A_k diag(b))^{-1} [k * g' | A_k v]      [W_z | Z] = b * [W | U] + [0 | v]
        q_read = q * g + A_q W_z     o = A_q Z + q_read S_in    S_out = M S_in + N
        [M | N] = (k * E)^T [W_z | Z] + [diag(g_C) | 0]

    The backward runs these products transposed, the triangular inverse's as two matmuls
    (see :class:`_UnitLowerSolve`), and collects each log decay's gradient from the terms it
    appears in: the pair decays (never through the plain-dot pairs, whose exponent is 0: their
    rounding would drown the true, tiny gradients of decays near 0), g, g', g_C and E.
    Against autograd over the same forward it skips the stacks, concatenations and masked
    copies of the general path."""

    @staticmethod
    def forward(ctx, q, k, v, b, lw, S_in):
        B, H, n, C, K = q.shape
        V = v.shape[-1]
        idx = torch.arange(C, device=q.device)
        strict_q = idx[None, :] < idx[:, None]                       # j < i
        strict_k = idx[None, :] < idx[:, None] - 1                   # j < i - 1
        dt = q.dtype
        ctx.floored = None
        if lw is None:
            g = g_prev = E = None
            Dq, Dk = strict_q.to(dt), strict_k.to(dt)
        else:
            lw_, Lam = _prefix_sums(lw)              # float64 (floored) if a chunk decays far
            if lw_ is not lw:
                ctx.floored = lw < LOG_W_FLOOR
            Lam2 = Lam * LOG2E                                       # (.., C, 1), log2 units
            Lam2_prev = F.pad(Lam2, (0, 0, 1, 0))[..., :C, :]
            g, g_prev = Lam2.to(dt).exp2(), Lam2_prev.to(dt).exp2()
            # decay from each token to the chunk's end, summed directly (no cancellation)
            E = F.pad(rcumsum(lw_)[..., 1:, :], (0, 0, 0, 1)).exp()
            col = Lam2.transpose(-1, -2)
            Dq = (Lam2 - col).to(dt).masked_fill_(~strict_q, float("-inf")).exp2_()
            Dk = F.pad(Dq[..., :-1, :], (0, 0, 1, 0))       # Dk[i] = Dq[i - 1] (Lam_{i-1})
        kk = bmm(k, k.transpose(-1, -2))
        qk = bmm(q, k.transpose(-1, -2))
        Ak = kk * Dk
        Ak.diagonal(-1, -2, -1).copy_(kk.diagonal(-1, -2, -1))      # pairs j = i - 1
        Aq = qk * Dq
        Aq.diagonal(0, -2, -1).copy_(qk.diagonal(0, -2, -1))        # pairs j = i
        eye = torch.eye(C, dtype=q.dtype, device=q.device).expand(Ak.shape)
        inv = torch.linalg.solve_triangular(-(Ak * b.transpose(-1, -2)), eye, upper=False,
                                            unitriangular=True)
        rhs = torch.cat([k if g_prev is None else k * g_prev, bmm(Ak, v)], -1)
        WU = bmm(inv, rhs)                                           # (.., C, K + V)
        WZ = b * WU
        WZ[..., K:] += v
        read = bmm(Aq, WZ)
        q_read = read[..., :K] + q if g is None else torch.addcmul(read[..., :K], q, g)
        kE = k if E is None else k * E
        MN = bmm(kE.transpose(-1, -2), WZ)                           # (.., K, K + V)
        M = MN[..., :K]
        M.diagonal(0, -2, -1).add_(1.0 if g is None else g[..., -1, :])
        # across chunks: S_{c+1} = M_c S_c + N_c, the entering states kept
        Mc = M.permute(2, 0, 1, 3, 4).reshape(n, B * H, K, K)
        Nc = MN[..., K:].permute(2, 0, 1, 3, 4).reshape(n, B * H, K, V)
        S0 = torch.empty(n, B * H, K, V, dtype=q.dtype, device=q.device)
        S = S_in.reshape(B * H, K, V)
        for c in range(n):
            S0[c] = S
            S = torch.baddbmm(Nc[c], Mc[c], S)
        S0 = S0.view(n, B, H, K, V).permute(1, 2, 0, 3, 4).contiguous()
        o = bmm(q_read, S0).add_(read[..., K:])
        ctx.save_for_backward(q, k, v, b, g, g_prev, E, Dq, Dk, kk, qk, Ak, Aq, inv, WU, WZ,
                              q_read, kE, Mc, S0)
        return o, S.view(B, H, K, V)

    @staticmethod
    @no_autocast
    def backward(ctx, dO, dS_out):
        (q, k, v, b, g, g_prev, E, Dq, Dk, kk, qk, Ak, Aq, inv, WU, WZ, q_read, kE, Mc,
         S0) = ctx.saved_tensors
        B, H, n, C, K = q.shape
        decay = g is not None
        dO = dO.contiguous()
        dq_read = bmm(dO, S0.transpose(-1, -2))                      # (.., C, K)
        dS0 = bmm(q_read.transpose(-1, -2), dO)                      # (.., K, V)
        # across chunks, backwards: dN_c is the adjoint of the state leaving chunk c
        dS0c = dS0.permute(2, 0, 1, 3, 4).reshape(n, B * H, K, -1)
        dNc = torch.empty_like(dS0c)
        lam = (torch.zeros_like(dS0c[0]) if dS_out is None
               else dS_out.reshape(B * H, K, -1).to(dS0c.dtype))
        for c in range(n - 1, -1, -1):
            dNc[c] = lam
            lam = torch.baddbmm(dS0c[c], Mc[c].transpose(-1, -2), lam)
        dN = dNc.view(n, B, H, K, -1).permute(1, 2, 0, 3, 4)
        dMN = torch.cat([bmm(dN, S0.transpose(-1, -2)), dN], -1)    # [dM | dN] (.., K, K + V)
        dkE = bmm(WZ, dMN.transpose(-1, -2))                         # (.., C, K)
        dWZ = bmm(kE, dMN)                                           # (.., C, K + V)
        dread = torch.cat([dq_read, dO], -1)
        dAq = bmm(dread, WZ.transpose(-1, -2))                       # (.., C, C)
        bmm_add(dWZ, Aq.transpose(-1, -2), dread)
        dv = dWZ[..., K:].clone()
        db = (dWZ * WU).sum(-1, keepdim=True)
        drhs = bmm(inv.transpose(-1, -2), dWZ.mul_(b))               # dWU, then d rhs
        dNb = bmm(drhs, WU.transpose(-1, -2)).tril_(-1)              # of A_k diag(b)
        dW, dU = drhs[..., :K], drhs[..., K:]
        dAk = bmm(dU, v.transpose(-1, -2))
        bmm_add(dv, Ak.transpose(-1, -2), dU)
        db += (dNb * Ak).sum(-2).unsqueeze(-1)
        dAk.addcmul_(dNb, b.transpose(-1, -2))
        dkk = dAk * Dk
        dkk.diagonal(-1, -2, -1).copy_(dAk.diagonal(-1, -2, -1))
        dqk = dAq * Dq
        dqk.diagonal(0, -2, -1).copy_(dAq.diagonal(0, -2, -1))
        dq = dq_read if not decay else dq_read * g
        dk = dW if not decay else dW * g_prev
        dlw = None
        if decay and ctx.needs_input_grad[4]:
            # the pair decays, off the plain-dot pairs: exp(L_i - Lam_j) gives +Z to row i's
            # L and -Z to Lam_j, Z = dA * A on the decayed pairs
            Zk = dkk * kk
            Zk.diagonal(-1, -2, -1).zero_()
            Zq = dqk * qk
            Zq.diagonal(0, -2, -1).zero_()
            dLam = (dq_read * q).sum(-1, keepdim=True).mul_(g)       # g = exp(Lam)
            dLam += Zq.sum(-1, keepdim=True)
            dLam -= (Zk.sum(-2) + Zq.sum(-2)).unsqueeze(-1)
            dLam_prev = (dW * k).sum(-1, keepdim=True).mul_(g_prev)  # g' = exp(Lam_{i-1})
            dLam_prev += Zk.sum(-1, keepdim=True)
            dLam[..., :-1, :] += dLam_prev[..., 1:, :]
            dM = dMN[..., :K]
            dLam[..., -1, :] += dM.diagonal(0, -2, -1).sum(-1, keepdim=True) * g[..., -1, :]
            dE = (dkE * k).sum(-1, keepdim=True).mul_(E)            # E_j = exp(sum_{s>j})
            dlw = rcumsum(dLam).add_(excl_cumsum(dE))
            if ctx.floored is not None:                  # the floor's gradient: 0 below it
                dlw.masked_fill_(ctx.floored, 0.0)
        bmm_add(dk, dkk + dkk.transpose(-1, -2), k)                  # kk = k k^T
        bmm_add(dk, dqk.transpose(-1, -2), q)                        # qk = q k^T
        bmm_add(dq, dqk, k)
        if decay:
            dk.addcmul_(dkE, E)
        else:
            dk += dkE
        return dq, dk, dv, db, dlw, lam.view(B, H, K, -1)
