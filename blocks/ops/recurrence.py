"""``gated_linear_recurrence``: the unified view of DESIGN.md, one op for linear attention,
RetNet, GLA, Mamba-2, Mamba-1 and RG-LRU. Per batch b and head h, with state S (K x V):

    S_t = G_t * S_{t-1} + k_t v_t^T          G_t = exp(log_g_t), broadcast over V
    o_t = S_t^T q_t                           (includes the current token)

``log_g`` (all entries <= 0) takes one of three shapes:

* ``None``: G = 1, linear attention (Katharopoulos et al. 2020). For its normaliser
  z_t = sum_{s<=t} k_s, append a column of ones to v: the last output column is q_t . z_t.
* (B, T, H): a scalar per head: RetNet (fixed gamma), Mamba-2 / SSD (Dao & Gu 2024, with
  q = C, k = B, v = dt * x, log g = dt * A).
* (B, T, H, K): a vector over the key dimension: GLA (Yang et al. 2023), RWKV-6 style decays.
* (B, T, H) with ``A`` (H, K): the vector gate log_g[..., None] * A, never materialised by
  the backends that need not. Mamba-1 (Gu & Dao 2023) is this case with one head per
  channel: H = d_inner, q = C and k = B shared by all heads (Hk = 1), K = d_state, V = 1,
  v = dt * x, log_g = dt and A its (negative) state matrix diagonal. RG-LRU (De et al. 2024)
  is the scalar case with K = V = 1 and q = k = 1.

Shapes: q, k (B, T, Hk, K); v (B, T, H, V); state (B, H, K, V). Hk divides H: head h reads
q and k of head h // (H / Hk), as Mamba-2's groups share B and C (Hk = H: one each).
Returns o (B, T, H, V) and the final state (B, H, K, V) in the dtype of ``q``; the backends
accumulate in float32 (float64 for float64 inputs).

Backends: ``reference`` (sequential), ``chunked`` (matmuls inside chunks; any shape) and, in
:mod:`blocks.ops.scan`, ``scan`` for V = 1, where there is no matmul to give (Mamba-1,
RG-LRU): ``auto`` picks it for those calls through the registry's shape declaration.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from composer.core.block import accum_dtype, no_autocast
from composer.core.registry import register_backend, register_op

OP = "gated_linear_recurrence"
register_op(OP, "S_t = exp(log_g_t) * S_{t-1} + k_t v_t^T, o_t = S_t^T q_t; log_g None, per head, "
                "per key dim, or per head times A per key dim (linear attention, RetNet, GLA, "
                "Mamba-2/SSD, Mamba-1, RG-LRU)")

VECTOR_CHUNK = 16
"""Longest chunk of the vector-gate chunked form (rounded up to a power of two, see
:class:`_VectorChunked`). Short chunks suit it: its intra-chunk work grows as C log C per token
and the state carried across chunks is cheap. Measured here (T=2048, 8 heads, K = V = 64,
forward + backward, interleaved): C = 8 took 0.078 s, 16 and 32 0.063 s, 64 0.065 s."""


LOG2E = 1.4426950408889634
"""log2(e): exponentials are taken as exp2(x log2 e), which torch computes about 3x faster
than exp here (0.15 against 0.44 ms per 2^20 numbers), at the cost of one rounding of x."""

NARROW_SPAN = 40.0
"""Largest decay inside one chunk, -sum of its log gates (per head, or per key dim), for which
a call takes the one-matmul form (:class:`_NarrowChunked`): there each pair's decay
exp(b_i - b_j) is the product exp(b_i) exp(-b_j) of the chunk's own prefix sums b, and the key
factor, at most exp(40) ~ 2e17, is far from overflow even in float32. Calls with a chunk
decaying further (gates near 0) take the forms whose exponents are all <= 0: the halving form
for vector gates, the decay-matrix form for scalar ones. Measured here (T=2048, 8 heads,
K = V = 64, forward + backward, interleaved): vector gates in [-1/8, 0] 0.031 s against 0.059 s
by halving; scalar gates in [-1, 0] 0.027 s against 0.032 s with the decay matrix (equal for
8 heads sharing one q and k, as in Mamba-2, where the decay-matrix form is kept)."""


def _log_gate(log_g, v: torch.Tensor, acc: torch.dtype, A=None) -> torch.Tensor:
    """log_g as (B, T, H, K') with K' = 1 (none or scalar gates) or K (vector gates, or a
    scalar per head times ``A`` (H, K))."""
    if log_g is None:
        return v.new_zeros(v.shape[:3] + (1,), dtype=acc)
    if A is not None:
        return log_g.to(acc)[..., None] * A.to(acc)
    return (log_g if log_g.dim() == 4 else log_g[..., None]).to(acc)


def _per_head(x: torch.Tensor, H: int) -> torch.Tensor:
    """q or k (B, T, Hk, K) repeated to H heads (head h reads head h // (H / Hk))."""
    return x if x.shape[2] == H else x.repeat_interleave(H // x.shape[2], dim=2)


def _initial(state, shape, acc, device) -> torch.Tensor:
    return torch.zeros(shape, dtype=acc, device=device) if state is None else state.to(acc)


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


@register_backend(OP, "chunked", priority=10)
@no_autocast
def recurrence_chunked(q, k, v, log_g=None, state=None, chunk_size: int = 64, A=None):
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
    q k^T is computed once per group of heads sharing q and k, and the backward is written by
    hand (:class:`_ScalarChunked`). Vector gates split each chunk recursively
    (:class:`_VectorChunked`), unless no chunk decays by more than exp(-NARROW_SPAN): then a
    chunk is one matmul of factors exp(+-prefix sums), bounded by exp(NARROW_SPAN)
    (:class:`_NarrowChunked`). With ``A`` the vector gate log_g[..., None] * A is materialised.
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
    # the one-matmul form where every chunk decays at most NARROW_SPAN: for vector gates, and
    # for scalar gates with q, k per head (shared q, k: the decay-matrix form computes q k^T
    # once per group; no gate: it has nothing to factor)
    narrow = (log_g is not None and (vector or Hk == H)
              and _decays_within(log_g, C, NARROW_SPAN))
    if vector:                                    # q, k per head
        q, k, Hk = _per_head(q, H), _per_head(k, H), H
        if not narrow:                            # the halving form: a power-of-two chunk
            C = 1 << (min(C, VECTOR_CHUNK) - 1).bit_length()
    n = -(-T // C)
    pad = n * C - T

    def prep(x, view=False):  # (B, T, h, X) -> (B, Hk, h / Hk, n, C, X); padded: k = v = l = 0
        x = x.to(acc).transpose(1, 2) if view else _heads_first(x, acc, pad)
        return x.reshape(B, Hk, -1, n, C, x.shape[-1])

    # the one-matmul form reads q, k and the gates only elementwise: without padding they go
    # in as head-major views of the caller's (B, T, H, X) tensors and their gradients come
    # back in that layout (six fewer transposing copies per call)
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


def _heads_first(x: torch.Tensor, acc: torch.dtype, pad: int) -> torch.Tensor:
    """(B, T, H, X) -> contiguous (B, H, T + pad, X) in ``acc``, zero-padded at the end, in one
    copy: F.pad with pad = 0 copies into the transposed strides (a copy every matmul would
    repeat), so it runs only where there is padding to add."""
    x = x.to(acc).transpose(1, 2)
    return (F.pad(x, (0, 0, 0, pad)) if pad else x).contiguous()


def _decays_within(log_g: torch.Tensor, C: int, span: float) -> bool:
    """Whether every chunk of C positions (along dim 1) sums its log gates to at least -span
    (per head and key dim). Settled by the smallest gate alone where C of it stay within span
    (one contiguous pass; the chunk sums read a transposed layout at a third of the speed)."""
    if log_g.numel() and float(log_g.detach().min()) * C >= -span:
        return True
    pad = -log_g.shape[1] % C
    x = F.pad(log_g, (0, 0) * (log_g.dim() - 2) + (0, pad)) if pad else log_g
    return bool(x.unflatten(1, (-1, C)).sum(2).min() >= -span)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for equal batch shapes, as one torch.bmm on views: torch.matmul copies
    (transposed) operands of more than three dims first (measured: 13 copies of 4 MB per call
    at T=2048, about a third of this op's time)."""
    batch = a.shape[:-2]
    out = torch.bmm(a.reshape((-1,) + a.shape[-2:]), b.reshape((-1,) + b.shape[-2:]))
    return out.view(batch + out.shape[-2:])


def _entering(U: torch.Tensor, gamma: torch.Tensor, S0, reverse: bool = False,
              dim: int = -3) -> tuple[torch.Tensor, torch.Tensor]:
    """Across chunks: the states entering each chunk, E (..., n, K, V), with E_0 = S0 and
    E_{c+1} = gamma_c * E_c + U_c (gamma broadcast to (..., n, K | 1, 1 | V)), and the state
    leaving the last chunk. ``reverse``: the adjoints leaving each chunk, E_{n-1} = S0 (0 for
    None) and E_{c-1} = gamma_c * E_c + U_c, and the adjoint entering the first. ``dim``: where
    the chunks lie in U and gamma (the states are the dims after it). Each step writes its slot
    in place (copying a separately made state in cost a fifth of the loop)."""
    n = U.shape[dim]
    E = torch.empty(U.shape, dtype=U.dtype, device=U.device)
    first, last, steps = ((n - 1, 0, range(n - 1, 0, -1)) if reverse
                          else (0, n - 1, range(n - 1)))
    # the chunks' slices, made once (unbind: one call for all n views)
    U_, g_, E_ = U.unbind(dim), gamma.unbind(dim), E.unbind(dim)
    if S0 is None:
        E_[first].zero_()
    else:
        E_[first].copy_(S0)
    step = -1 if reverse else 1
    for c in steps:
        torch.addcmul(U_[c], g_[c], E_[c], out=E_[c + step])
    out = torch.addcmul(U_[last], g_[last], E_[last])
    return E, out


def _bmm_add(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b in place (out contiguous), one baddbmm: no temporary product."""
    flat = out.view((-1,) + out.shape[-2:])
    flat.baddbmm_(a.reshape((-1,) + a.shape[-2:]), b.reshape((-1,) + b.shape[-2:]))


class _ScalarChunked(torch.autograd.Function):
    """The chunked form for one gate per head (or none), with a hand-written backward.

    q, k (B, Hk, 1, n, C, K); v (B, Hk, h, n, C, V); l (B, Hk, h, n, C); S0 (B, Hk, h, K, V)
    (h heads share each q/k group). Per chunk, with e_i = exp(sum_{s<=i} l_s),
    w_j = exp(sum_{s>j} l_s), gamma = exp(sum_s l_s) and D the decay matrix of
    :func:`segment_decay`:

        O = ((q k^T) * D) v + (e * q) S_in          S_out = gamma S_in + (w * k)^T v

    The backward runs the same pieces transposed: the adjoint of the entering states goes
    backwards across chunks, dS_in = (e * q)^T dO + gamma dS_out, and the log-gate gradient
    collects, as sums of the terms each l_s appears in, the decay matrix's part (one matmul
    with the same 0/1 matrix), the reverse cumsum of e's part, the exclusive prefix sum of
    w's part and gamma's part. Compared with autograd over the same forward it keeps no
    graph and writes fewer (C, C) temporaries.
    """

    @staticmethod
    def forward(ctx, q, k, v, l, S0):
        e = l.cumsum(-1).exp()                                         # (.., n, C)
        w = suffix_sum(l, -1).exp()
        gamma = l.sum(-1).exp()                                        # (.., n)
        D = segment_decay(l)                                           # (.., n, C, C)
        QK = _bmm(q, k.transpose(-1, -2))                              # (B, Hk, 1, n, C, C)
        P = QK * D
        O = _bmm(P, v)                                                 # (.., n, C, V)
        U = _bmm((k * w[..., None]).transpose(-1, -2), v)              # (.., n, K, V)
        E, S = _entering(U, gamma[..., None, None], S0)                # entering states
        _bmm_add(O, q * e[..., None], E)
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
        dP = _bmm(dO, v.transpose(-1, -2))                             # (.., n, C, C)
        dv = _bmm(P.transpose(-1, -2), dO)
        G = dP * D                                                     # d(QK) per head
        dQK = heads(G)
        dq = _bmm(dQK, k)
        dk = _bmm(dQK.transpose(-1, -2), q)
        # inter-chunk: O += (e q) E
        qe = q * e[..., None]                                          # (.., h, n, C, K)
        dqe = _bmm(dO, E.transpose(-1, -2))
        dE = _bmm(qe.transpose(-1, -2), dO)                            # (.., n, K, V)
        if h == 1:
            dq.addcmul_(dqe, e[..., None])
        else:
            dq.add_(heads(dqe * e[..., None]))
        # across chunks, backwards: S_out = gamma S_in + U
        dU, gS = _entering(dE, gamma[..., None, None], dS, reverse=True)  # dL/dS_out
        dgamma = (dU * E).sum((-1, -2))
        # U = (w k)^T v
        kw = k * w[..., None]
        dkw = _bmm(v, dU.transpose(-1, -2))                            # (.., n, C, K)
        _bmm_add(dv, kw, dU)
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


def _rcumsum(x: torch.Tensor) -> torch.Tensor:
    """sum_{i >= s} x_i along dim -2."""
    return x.flip(-2).cumsum(-2).flip(-2)


def _excl_cumsum(x: torch.Tensor) -> torch.Tensor:
    """sum_{j < s} x_j along dim -2 (0 at the first position), written in place of a padded
    copy (0.66 against 1.0 ms for 2^20 numbers here)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out[..., :1, :] = 0
    torch.cumsum(x[..., :-1, :], -2, out=out[..., 1:, :])
    return out


class _VectorChunked(torch.autograd.Function):
    """The chunked form for gates over the key dimension, with a hand-written backward.

    q, k, l (..., n, C, K); v (..., n, C, V); S0 (..., K, V); C a power of two. Per chunk,
    with e_i = exp(sum_{s<=i} l_s), w_j = exp(sum_{s>j} l_s), gamma = exp(sum_s l_s) (all per
    key dim):

        O = intra + (e * q) S_in                S_out = gamma * S_in + (w * k)^T v

    intra_i = sum_{j<=i} (sum_k q_ik k_jk exp(sum_{j<s<=i} l_sk)) v_j, by halving: in a block
    of 2b tokens, every pair with j in the left half and i in the right half splits its
    exponent at the midpoint m,

        sum_{j<s<=i} l_s = sum_{m<s<=i} l_s  +  sum_{j<s<=m} l_s,

    a query factor and a key factor, both sums of log-gates (<= 0, summed directly, never a
    difference of prefix sums), so those pairs are one (b x K) @ (K x b) matmul per block and
    no exponent is positive whatever the gates. The halves recurse down to single tokens,
    whose pair j = i has exponent 0. Work: log2(C) levels of O(C K) elementwise plus matmuls,
    against the (C, C, K) decay tensor of the direct form. (Yang et al. 2023, section 4.2,
    split a chunk once into sub-chunks and materialise the decays inside them; the recursive
    split is this module's.)

    The backward runs each piece transposed; a log-gate's gradient collects, for every sum it
    appears in, that sum's adjoint: reverse cumsums for the prefix sums (e and each level's
    query factors), exclusive prefix sums for the suffix sums (w and the key factors) and
    gamma's part for every position. Autograd over the same forward kept a graph of some 60
    nodes per call and spent a third of its time stacking and zero-filling.
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
        U = _bmm((k * w).transpose(-1, -2), v)                              # (.., n, K, V)
        E, S = _entering(U, gamma[..., None], S0)                           # (.., n, K, V)
        _bmm_add(O, q * e, E)
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
        dqe = _bmm(dO, E.transpose(-1, -2))                                  # (.., n, C, K)
        dE = _bmm(qe.transpose(-1, -2), dO)                                  # (.., n, K, V)
        dq = dqe * e
        dl = _rcumsum(dqe * qe)                                              # e's sums
        # across chunks, backwards: S_out = gamma S_in + U
        dU, gS = _entering(dE, gamma[..., None], dS, reverse=True)           # dL/dS_out
        dgamma = (dU * E).sum(-1)
        # U = (w k)^T v
        kw = k * w
        dkw = _bmm(v, dU.transpose(-1, -2))                                  # (.., n, C, K)
        dv = _bmm(kw, dU)
        dk = dkw * w
        dl += _excl_cumsum(dkw * kw)                                         # w's sums
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
            I(dl).add_(_rcumsum(dqI_ * qI_))                                 # eI's sums
            J(dl).add_(_excl_cumsum(dkJ_ * kJ_))                             # wJ's sums
            b //= 2
        return dq, dk, dv, dl, gS


class _NarrowChunked(torch.autograd.Function):
    """The chunked form for chunks that decay at most ``NARROW_SPAN``: one matmul per chunk for
    the pairs inside it. Shapes as :class:`_VectorChunked` (any C), l's last dim K or 1 (one
    gate per head), q, k possibly shared by the h heads of a group. With the chunk's prefix
    sums b_i = sum_{s<=i} l_s (<= 0, >= -NARROW_SPAN),

        qt = q * exp(b)    kt = k * exp(-b)    O = P v + qt S_in
        S_out = gamma * S_in + (w * k)^T v         (w_j = exp(sum_{s>j} l_s), as there)

    with P the lower part of qt kt^T, since exp(b_i - b_j) = exp(b_i) exp(-b_j); qt is also the
    query factor of the entering state. The backward: db_i = dqt_i qt_i - dkt_i kt_i, and each
    l_s collects the db_i at and after it, w's part before it and gamma's part. A pair's two
    factors cancel in the log-gate gradients before it, up to rounding of the pair's size: the
    pairs j = i (exponent 0, size q . k) therefore stay out of the factors, else that rounding
    would drown the true, tiny gradients of strongly decaying gates (measured: 1e-3 relative
    error in float32 at log g = -10 per token with the diagonal inside). The same holds for w's
    parts: they are collected before each l_s by a prefix sum of their own (folding them into
    gamma's part and the key factors' would cancel them after it, and the span tests fail). The
    prefix sums are a chunk's own; w_j k_j is taken as gamma kt_j (so (w k)^T v is gamma-scaled
    rows of kt^T v, and kt's adjoint through it is (v dU^T) gamma: no w is made at all), the
    exponentials as exp2 (see LOG2E), and the diagonal of P from the same product (q_i e_i . k_i
    / e_i, the pair's value up to rounding; only its gradient must stay out of the factors).

    Layouts: q, k and l are read only elementwise, so ``recurrence_chunked`` may pass them as
    head-major views of the caller's (B, T, H, X) tensors; products put a contiguous operand
    first (the result takes the first operand's layout), and the gradients of q, k and l are
    written in their inputs' layouts, so no transposing copy is made for them either way.

    Measured here (T=2048, 8 heads, K = V = 64, forward + backward, interleaved A/B in one
    process): exp(b_C - b_j) for w, exp2 and one prefix sum instead of three in the backward
    took 0.038 -> 0.034 s; then the views (and db in one fused product) 26.6 -> 24.6 ms for
    vector gates (1.08x) and 21.5 -> 19.4 ms per head (1.11x); with gamma kt, the diagonal
    from P and the quick span check of ``_decays_within`` too, 28.9 -> 24.8 ms (1.16x) and
    21.1 -> 18.3 ms (1.16x).
    """

    @staticmethod
    def forward(ctx, q, k, v, l, S0):
        # q, k, l may be strided views (see recurrence_chunked): every product below puts a
        # contiguous operand first, whose layout the result takes
        b = torch.mul(l, LOG2E, out=torch.empty(l.shape, dtype=l.dtype, device=l.device))
        b = b.cumsum_(-2)                                  # prefix sums in log2 units
        e = b.exp2_()
        gamma = e[..., -1, :]                                               # (.., n, K)
        qt = e * q
        kt = torch.div(k, e, out=torch.empty(qt.shape, dtype=e.dtype, device=e.device))
        P = _bmm(qt, kt.transpose(-1, -2)).tril_()                          # (.., n, C, C)
        O = _bmm(P, v)
        U = _bmm(kt.transpose(-1, -2), v).mul_(gamma[..., None])            # (w k)^T v
        E, S = _entering(U, gamma[..., None], S0)                           # (.., n, K, V)
        _bmm_add(O, qt, E)
        ctx.save_for_backward(q, k, v, e, qt, kt, P, E)
        ctx.l_layout = torch.empty_like(l, device="meta")          # l's gradient's layout
        return O, S

    @staticmethod
    @no_autocast
    def backward(ctx, dO, dS):
        q, k, v, e, qt, kt, P, E = ctx.saved_tensors
        gamma = e[..., -1, :]
        dO = dO.contiguous()
        dP = _bmm(dO, v.transpose(-1, -2)).tril_()
        d_diag = dP.diagonal(dim1=-2, dim2=-1)[..., None].clone()          # pairs j = i
        dP.diagonal(dim1=-2, dim2=-1).zero_()
        dv = _bmm(P.transpose(-1, -2), dO)
        dqt = _bmm(dP, kt)
        _bmm_add(dqt, dO, E.transpose(-1, -2))
        dkt = _bmm(dP.transpose(-1, -2), qt)
        dE = _bmm(qt.transpose(-1, -2), dO)                                  # (.., n, K, V)
        dU, gS = _entering(dE, gamma[..., None], dS, reverse=True)           # dL/dS_out
        dgamma = (dU * E).sum(-1)
        # U = (w k)^T v with w k = gamma kt: kt's adjoint through U is dkw gamma
        dUg = dU * gamma[..., None]
        dkwg = _bmm(v, dUg.transpose(-1, -2))                                # (.., n, C, K)
        _bmm_add(dv, kt, dUg)
        # to the inputs' shapes (q, k shared by the h heads of a group, gates one per head)
        # and layouts (written in place where a view came in)
        lsh = e.shape                                          # l's: (.., n, C, K or 1)
        db = torch.mul(dqt, qt).addcmul_(dkt, kt, value=-1).sum_to_size(lsh)
        dq = _like(q, dqt.shape)
        torch.mul(dqt, e, out=dq).addcmul_(d_diag, k)
        y = torch.mul(dkwg, kt).sum_to_size(lsh).sub_(db)      # y_j - db_j, y_j = dkw_j w_j k_j
        dk = _like(k, dkt.shape)
        torch.div(dkt.add_(dkwg), e, out=dk).addcmul_(d_diag, q)
        dq, dk = dq.sum_to_size(q.shape), dk.sum_to_size(k.shape)
        # l_s collects the db_i at and after it, w's parts before it, and gamma's part:
        # sum_{i>=s} db_i + sum_{j<s} y_j = (sum_i db_i + gamma's) + sum_{j<s} (y_j - db_j),
        # one prefix sum
        whole = db.sum(-2, keepdim=True).add_((dgamma * gamma).sum_to_size(
            lsh[:-2] + lsh[-1:])[..., None, :])
        dl = torch.add(_excl_cumsum(y), whole, out=_like(ctx.l_layout, lsh, e.device))
        return dq, dk, dv, dl, gS


def _like(x: torch.Tensor, shape, device=None) -> torch.Tensor:
    """An empty gradient buffer for x (or for the tensor whose layout the meta tensor x
    holds): x's layout where ``shape`` is x's (an input given as a view of another layout gets
    its gradient in that layout, so nothing copies it back; empty_like falls back to contiguous
    for overlapping layouts such as expanded ones), else contiguous (it is summed to x's shape
    afterwards)."""
    device = x.device if device is None else device
    if tuple(shape) != tuple(x.shape):
        return torch.empty(shape, dtype=x.dtype, device=device)
    if x.is_meta:
        return torch.empty_strided(shape, x.stride(), dtype=x.dtype, device=device)
    return torch.empty_like(x)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; for an inner dimension of at most 2 as broadcast products (measured here: a
    batched matmul of 2 x 2 by 2 x 64 blocks took 2.1 ms where two addcmuls took 0.3 ms)."""
    if a.shape[-1] > 2:
        return _bmm(a, b)
    out = a[..., :, :1] * b[..., :1, :]
    for j in range(1, a.shape[-1]):
        out.addcmul_(a[..., :, j:j + 1], b[..., j:j + 1, :])
    return out


def _mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T; for at most 2 rows as one broadcast product (0.38 against 0.56 ms for
    2 x 64 blocks here)."""
    if a.shape[-2] > 2:
        return _bmm(a, b.transpose(-1, -2))
    return (a[..., :, None, :] * b[..., None, :, :]).sum(-1)


def _half(x: torch.Tensor, b: int, side: int) -> torch.Tensor:
    """View of the left (side 0) or right (1) half of every block of 2b positions along dim -2:
    (..., C, X) -> (..., C / 2b, b, X)."""
    return x.unflatten(-2, (x.shape[-2] // (2 * b), 2, b)).select(-3, side)
