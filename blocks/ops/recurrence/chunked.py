"""``chunked`` backend of ``gated_linear_recurrence``: matmuls inside chunks, recurrence across
(forms :class:`_ScalarChunked`, :class:`_VectorChunked` and :class:`.narrow._NarrowChunked`)."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from blocks.ops.common import bmm, bmm_add, excl_cumsum, heads_first, rcumsum
from blocks.ops.recurrence import OP
from blocks.ops.recurrence._common import (NARROW_SPAN, _decays_within, _entering, _initial,
                                           _per_head)
from blocks.ops.recurrence.narrow import _NarrowChunked
from composer.core.block import accum_dtype, no_autocast
from composer.core.registry import register_backend

VECTOR_CHUNK = 16
"""Longest chunk of the halving form (rounded up to a power of two): its intra-chunk work grows
as C log C per token, and carrying the state across chunks is cheap."""


def _log_gate(log_g, v: torch.Tensor, acc: torch.dtype, A=None) -> torch.Tensor:
    """log_g as (B, T, H, K') with K' = 1 (none or scalar gates) or K (vector gates, or a
    scalar per head times ``A`` (H, K))."""
    if log_g is None:
        return v.new_zeros(v.shape[:3] + (1,), dtype=acc)
    if A is not None:
        return log_g.to(acc)[..., None] * A.to(acc)
    return (log_g if log_g.dim() == 4 else log_g[..., None]).to(acc)


@register_backend(OP, "chunked", priority=10)
@no_autocast
def recurrence_chunked(q, k, v, log_g=None, state=None, chunk_size: int = 64, A=None):
    """Chunkwise-parallel form: matmuls inside chunks of ``chunk_size``, recurrence across.

    With l_s = log g_s, S_0 the state entering a chunk and sums over the chunk's positions
    (per key dim for vector gates):

        o_i = (q_i * exp(sum_{s<=i} l_s))^T S_0
              + sum_{j<=i} (sum_k q_ik k_jk exp(sum_{j<s<=i} l_sk)) v_j
        S_C = exp(sum_s l_s) * S_0 + sum_j (k_j * exp(sum_{s>j} l_s)) v_j^T

    Every exponent is a sum of log gates (<= 0: no overflow for any gate), summed directly,
    never as a difference of prefix sums, so gradients stay exact to rounding where exp(...) is
    tiny. Scalar gates (or none): a (C x C) decay matrix, q k^T once per group of heads sharing
    q and k (:class:`_ScalarChunked`); vector gates: recursive halving (:class:`_VectorChunked`);
    either, where no chunk decays past exp(-NARROW_SPAN): one matmul of exp(+-prefix sums)
    factors (:class:`_NarrowChunked`). With ``A`` the gate log_g[..., None] * A is materialised.
    """
    if A is not None:
        log_g, A = _log_gate(log_g, v, accum_dtype(q.dtype), A), None
    B, T, H, V = v.shape
    Hk, K = q.shape[2:]
    acc = accum_dtype(q.dtype)
    S = _initial(state, (B, H, K, V), acc, q.device)
    if T == 0:
        return v.new_zeros(B, 0, H, V, dtype=q.dtype), S.to(q.dtype)
    vector = log_g is not None and log_g.dim() == 4
    C = max(1, min(chunk_size, T))
    # one-matmul form: vector gates, or scalar gates with q, k per head (shared q, k: the
    # decay-matrix form makes q k^T once per group; no gate: nothing to factor)
    narrow = (log_g is not None and (vector or Hk == H)
              and _decays_within(log_g, C, NARROW_SPAN))
    if vector:                                    # q, k per head
        q, k, Hk = _per_head(q, H), _per_head(k, H), H
        if not narrow:                            # the halving form: a power-of-two chunk
            C = 1 << (min(C, VECTOR_CHUNK) - 1).bit_length()
    n = -(-T // C)
    pad = n * C - T

    def prep(x, view=False):  # (B, T, h, X) -> (B, Hk, h / Hk, n, C, X); padded: k = v = l = 0
        x = x.to(acc).transpose(1, 2) if view else heads_first(x, acc, pad)
        return x.reshape(B, Hk, -1, n, C, x.shape[-1])

    # without padding the one-matmul form (elementwise reads only) takes q, k and the gates as
    # head-major views and returns their gradients in the caller's layout: no transposing copy
    view = narrow and not pad
    qc, kc, vc = prep(q, view), prep(k, view), prep(v)     # q, k: (B, Hk, 1, n, C, K)
    lg = prep(_log_gate(log_g, v, acc), view)              # (B, Hk, H / Hk, n, C, K')
    if not vector and not narrow:
        o, S = _ScalarChunked.apply(qc, kc, vc, lg[..., 0], S.reshape(B, Hk, H // Hk, K, V))
        o = o.reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)
        return o.to(q.dtype), S.reshape(B, H, K, V).to(q.dtype)
    form = _NarrowChunked if narrow else _VectorChunked
    o, S = form.apply(qc, kc, vc, lg, S.reshape(B, Hk, H // Hk, K, V))
    o = o.reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)
    return o.to(q.dtype), S.reshape(B, H, K, V).to(q.dtype)


class _ScalarChunked(torch.autograd.Function):
    """Decay-matrix form for one gate per head (or none), with a hand-written backward.

    q, k (B, Hk, 1, n, C, K); v (B, Hk, h, n, C, V); l (B, Hk, h, n, C); S0 (B, Hk, h, K, V)
    (h heads share each q/k group). Per chunk, with e_i = exp(sum_{s<=i} l_s),
    w_j = exp(sum_{s>j} l_s), gamma = exp(sum_s l_s) and D = :func:`segment_decay`:

        O = ((q k^T) * D) v + (e * q) S_in          S_out = gamma S_in + (w * k)^T v

    Backward: the same pieces transposed; the entering states' adjoint runs backwards across
    chunks, dS_in = (e * q)^T dO + gamma dS_out; dl_s sums the terms l_s appears in: D's part
    (one matmul with the same 0/1 matrix), the reverse cumsum of e's part, the exclusive prefix
    sum of w's part and gamma's part. By hand: no autograd graph, fewer (C, C) temporaries.
    """

    @staticmethod
    def forward(ctx, q, k, v, l, S0):
        e = l.cumsum(-1).exp()                                         # (.., n, C)
        w = suffix_sum(l, -1).exp()
        gamma = l.sum(-1).exp()                                        # (.., n)
        D = segment_decay(l)                                           # (.., n, C, C)
        QK = bmm(q, k.transpose(-1, -2))                               # (B, Hk, 1, n, C, C)
        P = QK * D
        O = bmm(P, v)                                                  # (.., n, C, V)
        U = bmm((k * w[..., None]).transpose(-1, -2), v)               # (.., n, K, V)
        E, S = _entering(U, gamma[..., None, None], S0)                # entering states
        bmm_add(O, q * e[..., None], E)
        ctx.save_for_backward(q, k, v, l, e, w, gamma, D, QK, P, E)
        return O, S

    @staticmethod
    @no_autocast
    def backward(ctx, dO, dS):
        q, k, v, l, e, w, gamma, D, QK, P, E = ctx.saved_tensors
        C = l.shape[-1]
        h = v.shape[2]
        heads = lambda x: x.sum(2, keepdim=True) if h > 1 else x      # noqa: E731  sum over h
        dO = dO.contiguous()
        # intra-chunk: O = (QK * D) v
        dP = bmm(dO, v.transpose(-1, -2))                              # (.., n, C, C)
        dv = bmm(P.transpose(-1, -2), dO)
        G = dP * D                                                     # d(QK) per head
        dQK = heads(G)
        dq = bmm(dQK, k)
        dk = bmm(dQK.transpose(-1, -2), q)
        # inter-chunk: O += (e q) E
        qe = q * e[..., None]                                          # (.., h, n, C, K)
        dqe = bmm(dO, E.transpose(-1, -2))
        dE = bmm(qe.transpose(-1, -2), dO)                             # (.., n, K, V)
        if h == 1:
            dq.addcmul_(dqe, e[..., None])
        else:
            dq.add_(heads(dqe * e[..., None]))
        # across chunks, backwards: S_out = gamma S_in + U
        dU, gS = _entering(dE, gamma[..., None, None], dS, reverse=True)  # dL/dS_out
        dgamma = (dU * E).sum((-1, -2))
        # U = (w k)^T v
        kw = k * w[..., None]
        dkw = bmm(v, dU.transpose(-1, -2))                             # (.., n, C, K)
        bmm_add(dv, kw, dU)
        if h == 1:
            dk.addcmul_(dkw, w[..., None])
        else:
            dk.add_(heads(dkw * w[..., None]))
        dl = None
        if ctx.needs_input_grad[3]:
            # D: each l_s appears in the entries (i, j) with j < s <= i
            between = _between(C, l.dtype, l.device)                     # (C, C * C)
            dl = ((G * QK).flatten(-2) @ between.transpose(0, 1))         # (.., n, C)
            de = (dqe * q).sum(-1) * e                                   # d/d(cumsum)
            dl = dl + de.flip(-1).cumsum(-1).flip(-1)                    # sum over i >= s
            dw = (dkw * k).sum(-1) * w                                   # d/d(suffix sums)
            dl = dl + F.pad(dw.cumsum(-1)[..., :-1], (1, 0))             # sum over j < s
            dl = dl + (dgamma * gamma)[..., None]
        return dq, dk, dv, dl, gS


def _between(L: int, dtype, device) -> torch.Tensor:
    """0/1 matrix (L, L * L): [s, (i, j)] = 1 when j < s <= i."""
    s_, i_, j_ = (torch.arange(L, device=device).view(shape) for shape in
                  ((L, 1, 1), (1, L, 1), (1, 1, L)))
    return ((j_ < s_) & (s_ <= i_)).to(dtype).view(L, L * L)


def segment_decay(x: torch.Tensor) -> torch.Tensor:
    """exp of segment sums: x (..., L) -> (..., L, L) with [i, j] = exp(sum_{j < s <= i} x_s)
    for j <= i and 0 above the diagonal.

    The sums are one matmul with a constant 0/1 matrix, so each entry adds exactly the terms it
    contains (never a difference of prefix sums), and the backward is one matmul too.
    """
    L = x.shape[-1]
    sums = (x @ _between(L, x.dtype, x.device)).unflatten(-1, (L, L))
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    return sums.exp() * causal.to(x.dtype)


def suffix_sum(x: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """sum_{s > j} x_s along ``dim`` (0 at the last position)."""
    tail = x.narrow(dim, 1, x.shape[dim] - 1).flip(dim).cumsum(dim).flip(dim)
    return torch.cat([tail, torch.zeros_like(x.narrow(dim, 0, 1))], dim)


class _VectorChunked(torch.autograd.Function):
    """Halving form for gates over the key dim, with a hand-written backward.

    q, k, l (..., n, C, K); v (..., n, C, V); S0 (..., K, V); C a power of two; e, w, gamma as
    in :class:`_ScalarChunked`, per key dim:

        O = intra + (e * q) S_in                S_out = gamma * S_in + (w * k)^T v

    intra_i = sum_{j<=i} (sum_k q_ik k_jk exp(sum_{j<s<=i} l_sk)) v_j by halving: in a block of
    2b tokens a pair with j in the left half and i in the right splits its exponent at the
    midpoint m, sum_{j<s<=i} l_s = sum_{m<s<=i} l_s + sum_{j<s<=m} l_s, into a query and a key
    factor, both sums of log gates (<= 0), so those pairs are one (b x K) @ (K x b) matmul per
    block. The halves recurse down to single tokens (pair j = i, exponent 0): log2(C) levels
    of O(C K) work instead of a (C, C, K) decay tensor. (Yang et al. 2023, section 4.2, split a
    chunk once; the recursive split is this module's.)

    Backward: each piece transposed; dl collects every sum's adjoint: reverse cumsums for the
    prefix sums (e, the query factors), exclusive prefix sums for the suffix sums (w, the key
    factors), gamma's part everywhere. By hand: autograd keeps a large graph per call.
    """

    @staticmethod
    def forward(ctx, q, k, v, l, S0):
        C = q.shape[-2]
        e = l.cumsum(-2).exp()
        w = suffix_sum(l).exp()
        gamma = l.sum(-2).exp()                                             # (.., n, K)
        O = (q * k).sum(-1, keepdim=True) * v                               # pairs j = i
        saved = []
        b = C // 2
        while b >= 1:
            I, J = partial(_half, b=b, side=1), partial(_half, b=b, side=0)
            eI, wJ = I(l).cumsum(-2).exp(), suffix_sum(J(l)).exp()
            qI_, kJ_ = I(q) * eI, J(k) * wJ
            P = _mm_t(qI_, kJ_)                                              # (.., b, b)
            I(O).add_(_mm(P, J(v)))
            saved += [eI, wJ, P]
            b //= 2
        U = bmm((k * w).transpose(-1, -2), v)                               # (.., n, K, V)
        E, S = _entering(U, gamma[..., None], S0)                           # (.., n, K, V)
        bmm_add(O, q * e, E)
        ctx.save_for_backward(q, k, v, e, w, gamma, E, *saved)
        return O, S

    @staticmethod
    @no_autocast
    def backward(ctx, dO, dS):
        q, k, v, e, w, gamma, E, *saved = ctx.saved_tensors
        C = q.shape[-2]
        dO = dO.contiguous()
        # inter-chunk: O += (e q) E_in
        qe = q * e
        dqe = bmm(dO, E.transpose(-1, -2))                                   # (.., n, C, K)
        dE = bmm(qe.transpose(-1, -2), dO)                                   # (.., n, K, V)
        dq = dqe * e
        dl = rcumsum(dqe * qe)                                               # e's sums
        # across chunks, backwards: S_out = gamma S_in + U
        dU, gS = _entering(dE, gamma[..., None], dS, reverse=True)           # dL/dS_out
        dgamma = (dU * E).sum(-1)
        # U = (w k)^T v
        kw = k * w
        dkw = bmm(v, dU.transpose(-1, -2))                                   # (.., n, C, K)
        dv = bmm(kw, dU)
        dk = dkw * w
        dl += excl_cumsum(dkw * kw)                                          # w's sums
        dl += (dgamma * gamma)[..., None, :]                                 # gamma's
        # pairs j = i: O = (q . k) v
        dv.addcmul_((q * k).sum(-1, keepdim=True), dO)
        dqk = (dO * v).sum(-1, keepdim=True)
        dq.addcmul_(dqk, k)
        dk.addcmul_(dqk, q)
        # halving levels: O_I += ((q_I eI) (k_J wJ)^T) v_J
        b = C // 2
        for eI, wJ, P in zip(*[iter(saved)] * 3):
            I, J = partial(_half, b=b, side=1), partial(_half, b=b, side=0)
            qI_, kJ_, vJ, dOI = I(q) * eI, J(k) * wJ, J(v), I(dO)
            J(dv).add_(_mm(P.transpose(-1, -2), dOI))
            dP = _mm_t(dOI, vJ)
            dqI_, dkJ_ = _mm(dP, kJ_), _mm(dP.transpose(-1, -2), qI_)
            I(dq).addcmul_(dqI_, eI)
            J(dk).addcmul_(dkJ_, wJ)
            I(dl).add_(rcumsum(dqI_ * qI_))                                  # eI's sums
            J(dl).add_(excl_cumsum(dkJ_ * kJ_))                              # wJ's sums
            b //= 2
        return dq, dk, dv, dl, gS



def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; for an inner dimension of at most 2 as broadcast products (addcmuls), which
    beat a batched matmul of such thin blocks."""
    if a.shape[-1] > 2:
        return bmm(a, b)
    out = a[..., :, :1] * b[..., :1, :]
    for j in range(1, a.shape[-1]):
        out.addcmul_(a[..., :, j:j + 1], b[..., j:j + 1, :])
    return out


def _mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T; for at most 2 rows as one broadcast product, which beats a batched matmul of
    such thin blocks."""
    if a.shape[-2] > 2:
        return bmm(a, b.transpose(-1, -2))
    return (a[..., :, None, :] * b[..., None, :, :]).sum(-1)


def _half(x: torch.Tensor, b: int, side: int) -> torch.Tensor:
    """View of the left (side 0) or right (1) half of every block of 2b positions along dim -2:
    (..., C, X) -> (..., C / 2b, b, X)."""
    return x.unflatten(-2, (x.shape[-2] // (2 * b), 2, b)).select(-3, side)
