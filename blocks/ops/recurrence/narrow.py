"""The one-matmul form of ``gated_linear_recurrence``'s ``chunked`` backend, for calls whose
chunks decay at most ``NARROW_SPAN``: each chunk's pairs factor through its own prefix sums."""
from __future__ import annotations

import torch

from blocks.ops.common import LOG2E, bmm, bmm_add, excl_cumsum
from blocks.ops.recurrence._common import _entering
from composer.core.block import no_autocast


class _NarrowChunked(torch.autograd.Function):
    """One-matmul form for chunks that decay at most ``NARROW_SPAN``. Shapes as
    :class:`.chunked._VectorChunked` (any C); l's last dim K or 1 (one gate per head); q, k may
    be shared by the h heads of a group. With the chunk's prefix sums b_i = sum_{s<=i} l_s
    (in [-NARROW_SPAN, 0]) and w_j = exp(sum_{s>j} l_s):

        qt = q * exp(b)    kt = k * exp(-b)    O = P v + qt S_in    P = lower(qt kt^T)
        S_out = gamma * S_in + (w * k)^T v

    since exp(b_i - b_j) = exp(b_i) exp(-b_j). Backward: db_i = dqt_i qt_i - dkt_i kt_i; l_s
    collects the db_i at and after it, w's parts before it and gamma's part. The pairs j = i
    (exponent 0) and w's parts (a prefix sum of their own) stay out of the factors, where they
    would cancel only up to rounding, drowning the tiny gradients of strongly decaying gates.
    w_j k_j is taken as gamma kt_j (no w is made), exponentials as exp2 (LOG2E), P's diagonal
    from the same product (only its gradient must stay out of the factors).

    q, k and l are read only elementwise and may be head-major views (``recurrence_chunked``):
    products put a contiguous operand first, and their gradients come back in their layouts.
    """

    @staticmethod
    def forward(ctx, q, k, v, l, S0):
        # q, k, l may be strided views: each product puts a contiguous operand first
        b = torch.mul(l, LOG2E, out=torch.empty(l.shape, dtype=l.dtype, device=l.device))
        b = b.cumsum_(-2)                                  # prefix sums in log2 units
        e = b.exp2_()
        gamma = e[..., -1, :]                                               # (.., n, K)
        qt = e * q
        kt = torch.div(k, e, out=torch.empty(qt.shape, dtype=e.dtype, device=e.device))
        P = bmm(qt, kt.transpose(-1, -2)).tril_()                           # (.., n, C, C)
        O = bmm(P, v)
        U = bmm(kt.transpose(-1, -2), v).mul_(gamma[..., None])             # (w k)^T v
        E, S = _entering(U, gamma[..., None], S0)                           # (.., n, K, V)
        bmm_add(O, qt, E)
        ctx.save_for_backward(q, k, v, e, qt, kt, P, E)
        ctx.l_layout = torch.empty_like(l, device="meta")          # l's gradient's layout
        return O, S

    @staticmethod
    @no_autocast
    def backward(ctx, dO, dS):
        q, k, v, e, qt, kt, P, E = ctx.saved_tensors
        gamma = e[..., -1, :]
        dO = dO.contiguous()
        dP = bmm(dO, v.transpose(-1, -2)).tril_()
        d_diag = dP.diagonal(dim1=-2, dim2=-1)[..., None].clone()          # pairs j = i
        dP.diagonal(dim1=-2, dim2=-1).zero_()
        dv = bmm(P.transpose(-1, -2), dO)
        dqt = bmm(dP, kt)
        bmm_add(dqt, dO, E.transpose(-1, -2))
        dkt = bmm(dP.transpose(-1, -2), qt)
        dE = bmm(qt.transpose(-1, -2), dO)                                   # (.., n, K, V)
        dU, gS = _entering(dE, gamma[..., None], dS, reverse=True)           # dL/dS_out
        dgamma = (dU * E).sum(-1)
        # U = (w k)^T v with w k = gamma kt: kt's adjoint through U is dkw gamma
        dUg = dU * gamma[..., None]
        dkwg = bmm(v, dUg.transpose(-1, -2))                                 # (.., n, C, K)
        bmm_add(dv, kt, dUg)
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
        dl = torch.add(excl_cumsum(y), whole, out=_like(ctx.l_layout, lsh, e.device))
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

