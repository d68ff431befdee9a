"""``scan`` and ``scan_recompute``: ``gated_linear_recurrence`` for diagonal shapes (V = 1).

With one value column per head the recurrence is independent scalar recurrences, one per
(batch, head, key dim):

    h_t = a_t * h_{t-1} + v_t k_t        a_t = exp(log gate_t) in (0, 1]
    o_t = sum_k q_tk h_tk

as in Mamba-1 (H = d_inner heads sharing B = k and C = q, K = d_state, log gate = dt_t * A) and
RG-LRU (K = 1, scalar gates). There is no matmul to give (``chunked`` would spend a (C, C, K)
decay tensor per head and chunk, C times the recurrence itself), so the recurrence stays
elementwise, made chunk-parallel: n chunks of L steps, every Python-level step working on all
n chunks at once (L + n steps instead of T, each step's tensors in cache).

Forward, in three stages (a step: one position l in every chunk):
1. L steps: each chunk's own final state from zero (its gate product: the exp of its summed
   log gates, taken once);
2. n steps: the state entering each chunk, carried across chunks;
3. L steps: the states again from the entering ones, kept for the backward, and o_t.
No gate product is inverted (no exp of a positive number, no division): decays down to exactly
0 are fine. Each stage remakes a step's gates from its log gates (in cache) into one
step-sized buffer: keeping them, a (T, H, K) tensor written once and read three times from
memory, is no faster, and not keeping them halves what a call holds for its backward.

Backward (by hand, :class:`_DiagonalScan`): the adjoint g_t = dL/dh_t runs the same three
stages backwards in time, g_t = dy_t q_t + a_{t+1} g_{t+1} (+ dL/dh_T at the end); each step
of the last stage gives dL/dv_t = g_t . k_t, dL/dk_t = sum_heads g_t v_t,
dL/dq_t = sum_heads dy_t h_t and dL/d(log a_t) = g_t a_t h_{t-1} while its tensors are in
cache. Autograd keeps one (T, H, K) tensor of states per call (besides its inputs), no graph.

K = 1 (RG-LRU) with every chunk decaying at most NARROW_SPAN takes whole-tensor prefix sums
per chunk instead (:class:`_NarrowK1`): its steps would be too small to pay for themselves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from blocks.ops.common import LOG2E
from blocks.ops.recurrence import OP
from blocks.ops.recurrence._common import NARROW_SPAN, _decays_within, _entering
from composer.core.block import accum_dtype, no_autocast
from composer.core.registry import register_backend


STEP_NUMBERS = 1 << 19
"""Numbers per step tensor the scan aims at (2 MB in float32): small enough for a step's
tensors to stay in cache, where the steps run several times faster than from memory."""


def _diagonal_only(q, k, v, log_g=None, state=None, chunk_size: int = 64, A=None):
    """V = 1 (one value column per head: Mamba-1, RG-LRU)"""
    if v.shape[-1] != 1:
        return (f"it runs one value column per head (V = 1, as Mamba-1 and RG-LRU); "
                f"this call has V = {v.shape[-1]}")
    return None


@register_backend(OP, "scan", priority=20, accepts=_diagonal_only)
@no_autocast
def recurrence_scan(q, k, v, log_g=None, state=None, chunk_size: int = 64, A=None):
    """Chunk-parallel elementwise scan for V = 1 (Mamba-1, RG-LRU), hand-written backward."""
    return _scan(q, k, v, log_g, state, chunk_size, A, recompute=False)


@register_backend(OP, "scan_recompute", priority=15, accepts=_diagonal_only)
@no_autocast
def recurrence_scan_recompute(q, k, v, log_g=None, state=None, chunk_size: int = 64, A=None):
    """``scan`` keeping only its inputs for the backward: each segment's gates and states are
    made again there, one segment at a time (one more forward's work). ``scan`` keeps all
    its states, T x H x K numbers per call: at T=16384, d_inner 512 and d_state 16, 512 MiB
    per Mamba-1 layer until the backward. Chosen by name (``kernels.gated_linear_recurrence=
    scan_recompute``); ``auto`` prefers the faster ``scan``."""
    return _scan(q, k, v, log_g, state, chunk_size, A, recompute=True)


def _scan(q, k, v, log_g, state, chunk_size, A, recompute: bool):
    B, T, H, _ = v.shape
    Hk, K = q.shape[2:]
    acc = accum_dtype(q.dtype)
    h0 = (torch.zeros(B, H, K, dtype=acc, device=q.device) if state is None
          else state[..., 0].to(acc))
    if T == 0:
        return v.new_zeros(B, 0, H, 1, dtype=q.dtype), h0[..., None].to(q.dtype)
    if log_g is None:
        log_g = v.new_zeros(B, T, H, dtype=acc)
    L = max(1, min(chunk_size, T))
    # segments of whole chunks, one after another: a step's tensors (n * B * H * K numbers)
    # stay cache-sized however long T is
    seg = L * max(1, STEP_NUMBERS // (B * H * K))
    if K == 1 and not recompute:
        # K = 1 (RG-LRU): the prefix-sum form, where every chunk decays at most NARROW_SPAN
        lg = log_g.to(acc)
        lg = lg[..., 0] if lg.dim() == 4 else lg if A is None else lg * A.to(acc)[:, 0]
        if _decays_within(lg, L, NARROW_SPAN):
            return _narrow_k1(q, k, v, lg, h0[..., 0], L, acc)
    Af = None if A is None else A.to(acc)
    ys, h = [], h0
    for s in range(0, T, seg):
        part = [t[:, s:s + seg].to(acc) for t in (q, k, v[..., 0], log_g)]
        extra = [Af] if A is not None else []
        if recompute and torch.is_grad_enabled():
            y, h = checkpoint(_DiagonalScan.apply, h, L, A is not None, *part, *extra,
                              use_reentrant=False)
        else:
            y, h = _DiagonalScan.apply(h, L, A is not None, *part, *extra)
        ys.append(y)
    y = ys[0] if len(ys) == 1 else torch.cat(ys, 1)
    return y[..., None].to(q.dtype), h[..., None].to(q.dtype)


def _narrow_k1(q, k, v, lg, h0, L: int, acc):
    """K = 1 through :class:`_NarrowK1`: q, k (B, T, Hk, 1), v (B, T, H, 1), lg (B, T, H),
    h0 (B, H); returns o (B, T, H, 1) and the final state (B, H, 1, 1) in q's dtype."""
    B, T, H, _ = v.shape
    Hk = q.shape[2]
    n = -(-T // L)

    def chunks(t):          # (B, T, H) -> (B, n, H, L), zero-padded: sums run along dim -1
        t = (F.pad(t, (0, 0, 0, n * L - T)) if n * L != T else t).view(B, n, L, H)
        return t.transpose(-1, -2).contiguous()

    x = (v[..., 0].to(acc).view(B, T, Hk, -1) * k.to(acc)).reshape(B, T, H)   # k_t v_t
    hs, h = _NarrowK1.apply(chunks(x), chunks(lg), h0)
    hs = hs.transpose(-1, -2).reshape(B, n * L, Hk, -1)[:, :T]
    o = hs * q.to(acc)
    return o.reshape(B, T, H, 1).to(q.dtype), h.view(B, H, 1, 1).to(q.dtype)


class _NarrowK1(torch.autograd.Function):
    """The scan for K = V = 1 (RG-LRU) where every chunk decays at most NARROW_SPAN: prefix sums
    instead of steps. x, l (B, n, H, L) (inputs k_t v_t and log gates), h0 (B, H). With b the
    chunk's prefix sums of l (>= -NARROW_SPAN) and h_in the state entering the chunk,

        h_i = x_i + exp(b_i) (sum_{j<i} exp(-b_j) x_j + h_in)

    the pairs j = i kept out of the factors (as in :class:`.narrow._NarrowChunked`). Chunks lie
    along the last dim, where torch's prefix sums run faster; the states across chunks run as
    ``_entering``'s loop on (B, H) numbers; the backward is written by hand."""

    @staticmethod
    def forward(ctx, x, l, h0):
        b = (l * LOG2E).cumsum_(-1)                                  # log2 units
        e = b.exp2()
        einv = b.neg_().exp2_()
        total = F.pad((einv * x)[..., :-1], (1, 0)).cumsum_(-1)      # sum_{j<i}
        last = torch.addcmul(x[..., -1], e[..., -1], total[..., -1])  # from zero
        gamma = e[..., -1]
        h_in, h = _entering(last, gamma, h0, dim=1)                  # across chunks
        total += h_in[..., None]
        hs = torch.addcmul(x, e, total)
        ctx.save_for_backward(x, e, einv, total)
        return hs, h

    @staticmethod
    @no_autocast
    def backward(ctx, dhs, dh):
        x, e, einv, total = ctx.saved_tensors
        gamma = e[..., -1]
        # the state leaving chunk c is its last h, S_c, and enters every position of chunk
        # c + 1: lam_c = dL/dS_c = sum_i dhs_{c+1,i} e_{c+1,i} + gamma_{c+1} lam_{c+1}
        t0 = (dhs * e).sum(-1)                                       # (B, n, H)
        lams, lam = _entering(t0, gamma, dh, reverse=True, dim=1)    # lam: dL/dh0
        D = dhs.clone(memory_format=torch.contiguous_format)
        D[..., -1] += lams                                           # dL/dh, all uses
        u = D * e
        later = F.pad(u[..., 1:].flip(-1).cumsum(-1).flip(-1), (0, 1))   # sum_{i>j} u_i
        dx = torch.addcmul(D, einv, later)
        # b_i enters as exp(b_i) (in h_i) and as exp(-b_i) (in the later h_j)
        db = (u * total).sub_(later * einv * x)
        return dx, db.flip(-1).cumsum(-1).flip(-1), lam


def _steps(t: torch.Tensor, L: int) -> torch.Tensor:
    """(B, T, *rest) -> step-major (L, B, n, *rest), contiguous, zero-padded at the end:
    [l, :, c] is position c * L + l."""
    B, T = t.shape[:2]
    n = -(-T // L)
    t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, n * L - T)) if n * L != T else t
    return t.view(B, n, L, *t.shape[2:]).movedim(2, 0).contiguous()


def _gates(lgs: torch.Tensor, At2, dtype):
    """gate(l): the gates a_l = exp2(log2 e * log gate) of step l, written into one buffer
    of a step's size (each call overwrites the last one's)."""
    factored = At2 is not None
    buf = torch.empty(lgs.shape[1:-2] + (At2.shape[-2:] if factored else lgs.shape[-2:]),
                      dtype=dtype, device=lgs.device)
    lg_ = lgs.unbind(0)

    def gate(l: int) -> torch.Tensor:
        return torch.mul(lg_[l], At2 if factored else LOG2E, out=buf).exp2_()
    return gate


def _unsteps(t: torch.Tensor, T: int) -> torch.Tensor:
    """Step-major (L, B, n, *rest) -> (B, T, *rest)."""
    L, B, n = t.shape[:3]
    return t.movedim(0, 2).reshape(B, n * L, *t.shape[3:])[:, :T]


class _DiagonalScan(torch.autograd.Function):
    """Inputs in the working dtype: q, k (B, T, Hk, K); v (B, T, H); log_g (B, T, H) or
    (B, T, H, K), or (B, T, H) scaled by A (H, K) when ``factored``; h0 (B, H, K).

    Heads are (Hk, R), R = H / Hk heads per q/k group; tensors are step-major,
    (L, B, n, Hk, K | 1, R | 1), one step a contiguous slice. States are (K, R), heads last:
    reading h with q is then a batched (1, K) @ (K, R) product, several times faster than the
    (R, K) layout's K-long dot products.
    """

    @staticmethod
    def forward(ctx, h0, L, factored, q, k, v, log_g, *maybe_A):
        B, T, H = v.shape
        Hk, K = q.shape[2:]
        R = H // Hk
        qs = _steps(q, L).unsqueeze(-1)                                  # (L, B, n, Hk, K, 1)
        ks = _steps(k, L).unsqueeze(-1)
        vs = _steps(v, L).view(L, B, -1, Hk, 1, R)                       # (L, B, n, Hk, 1, R)
        n = vs.shape[2]
        At = maybe_A[0].view(Hk, R, K).transpose(-1, -2).contiguous() if factored else None
        if log_g.dim() == 4:
            lgs = _steps(log_g, L).view(L, B, n, Hk, R, K).transpose(-1, -2)
        else:                                                            # dt, or one per head
            lgs = _steps(log_g, L).view(L, B, n, Hk, 1, R)
        total = lgs.sum(0)                                               # gates of a chunk
        total = (total * At if factored else total).exp_()
        # gates made step by step (_gates) while their slice is in cache, as exp2(x log2 e)
        # (LOG2E; the extra rounding of x log2 e is that of forming x itself)
        At2 = At * LOG2E if factored else None
        h0 = h0.view(B, Hk, R, K).transpose(-1, -2)                      # (B, Hk, K, R)
        shape = (B, n, Hk, K, R)

        # the steps' slices, made once, and flat (N, ., .) views for the products, which
        # torch.bmm takes without torch.matmul's reshapes
        N = B * n * Hk
        k_, v_ = ks.unbind(0), vs.unbind(0)
        gate = _gates(lgs, At2, q.dtype)
        # 1. each chunk's own final state, from zero
        own = torch.mul(k_[0], v_[0])
        for l in range(1, L):
            own.mul_(gate(l)).addcmul_(k_[l], v_[l])
        # 2. the state entering each chunk
        entering, h = _entering(own, total, h0, dim=1)
        # 3. all states, kept, and the outputs
        Hs = torch.empty((L,) + shape, dtype=q.dtype, device=q.device)
        ys = torch.empty((L, N, 1, R), dtype=q.dtype, device=q.device)
        q_, H_, y_ = qs.view(L, N, 1, K).unbind(0), Hs.unbind(0), ys.unbind(0)
        cur = entering
        for l in range(L):
            cur = torch.mul(gate(l), cur, out=H_[l]).addcmul_(k_[l], v_[l])
            torch.bmm(q_[l], cur.view(N, K, R), out=y_[l])
        ys = ys.view(L, B, n, Hk, 1, R)
        ctx.save_for_backward(qs, ks, vs, lgs, Hs, entering, *maybe_A)
        ctx.L, ctx.T, ctx.factored, ctx.vector = L, T, factored, log_g.dim() == 4
        return _unsteps(ys, T).reshape(B, T, H), h.transpose(-1, -2).reshape(B, H, K)

    @staticmethod
    @no_autocast
    def backward(ctx, dy, dh):
        qs, ks, vs, lgs, Hs, entering, *maybe_A = ctx.saved_tensors
        L, T, factored = ctx.L, ctx.T, ctx.factored
        _, B, n, Hk, K, R = Hs.shape
        H = Hk * R
        vector = ctx.vector
        shape = (B, n, Hk, K, R)
        new = dict(dtype=Hs.dtype, device=Hs.device)
        dys = _steps(dy, L).view(L, B, n, Hk, 1, R)
        dh = (torch.zeros(B, Hk, K, R, **new) if dh is None
              else dh.view(B, Hk, R, K).transpose(-1, -2))
        At = maybe_A[0].view(Hk, R, K).transpose(-1, -2).contiguous() if factored else None
        gate = _gates(lgs, At * LOG2E if factored else None, Hs.dtype)
        q_, dy_ = qs.unbind(0), dys.unbind(0)

        # 1. each chunk's own adjoint at its first step (from zero after its last), and the
        #    product of the gates after its first step, a_1 ... a_{L-1}
        own = torch.mul(q_[L - 1], dy_[L - 1])
        for l in range(L - 2, -1, -1):
            own.mul_(gate(l + 1)).addcmul_(q_[l], dy_[l])
        after_first = lgs[1:].sum(0)
        after_first = (after_first * At if factored else after_first).exp_()
        # 2. the adjoint arriving at each chunk's last step from the later chunks
        arriving = torch.empty(shape, **new)
        a0 = gate(0)                     # the buffer: no gate(l) is made until after this loop
        lam = dh
        for c in range(n - 1, -1, -1):
            arriving[:, c] = lam
            lam = a0[:, c] * torch.addcmul(own[:, c], after_first[:, c], lam)
        # 3. the adjoint at every step, and the gradients; products over heads as
        # (1, R) @ (R, K) on transposed views (much faster in torch.bmm than (K, R) @ (R, 1))
        N = B * n * Hk
        dq = torch.empty((L, N, 1, K), **new)
        dk = torch.empty_like(dq)
        dv = torch.empty((L, N, 1, R), **new)
        dlog = torch.empty(Hs.shape if vector else vs.shape, **new)
        if factored:
            dA = torch.zeros(shape, **new)                               # summed over (B, n)
            zA = torch.empty(shape, **new)
        g = torch.empty(shape, **new)
        z = torch.empty(shape, **new)
        gT = g.view(N, K, R).transpose(1, 2)
        H_, lg_, dl_ = Hs.unbind(0), lgs.unbind(0), dlog.unbind(0)
        kT_, v_ = ks.view(L, N, 1, K).unbind(0), vs.view(L, N, 1, R).unbind(0)
        dyT_ = dys.reshape(L, N, 1, R).unbind(0)
        dq_, dk_, dv_ = dq.unbind(0), dk.unbind(0), dv.unbind(0)
        carry = arriving
        for l in range(L - 1, -1, -1):
            torch.addcmul(carry, q_[l], dy_[l], out=g)                    # dL/dh_t
            torch.bmm(kT_[l], g.view(N, K, R), out=dv_[l])
            torch.bmm(v_[l], gT, out=dk_[l])
            torch.bmm(dyT_[l], H_[l].view(N, K, R).transpose(1, 2), out=dq_[l])
            al = gate(l)                                                  # a_t g_t
            carry = al.mul_(g) if al.shape == g.shape else al * g
            zl = dl_[l] if vector else z
            torch.mul(carry, H_[l - 1] if l else entering, out=zl)        # dL/d(log a_t)
            if factored:                                                  # log a_t = dt_t A
                torch.sum(torch.mul(zl, At, out=zA), -2, keepdim=True, out=dl_[l])
                dA.addcmul_(zl, lg_[l])
            elif not vector:
                torch.sum(zl, -2, keepdim=True, out=dl_[l])
        dq, dk = dq.view(L, B, n, Hk, K, 1), dk.view(L, B, n, Hk, K, 1)
        dv = dv.view(vs.shape)
        grads = [carry[:, 0].transpose(-1, -2).reshape(B, H, K), None, None,
                 _unsteps(dq, T).reshape(B, T, Hk, K), _unsteps(dk, T).reshape(B, T, Hk, K),
                 _unsteps(dv, T).reshape(B, T, H)]
        if vector:
            grads.append(_unsteps(dlog.transpose(-1, -2), T).reshape(B, T, H, K))
        else:
            grads.append(_unsteps(dlog, T).reshape(B, T, H))
        if factored:
            grads.append(dA.sum((0, 1)).transpose(-1, -2).reshape(H, K))
        return tuple(grads)
