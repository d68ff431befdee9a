"""Helpers the backends of ``gated_linear_recurrence`` share."""
from __future__ import annotations

import torch
import torch.nn.functional as F

NARROW_SPAN = 40.0
"""Largest decay inside one chunk, -sum of its log gates (per head, or per key dim), for which
a call takes the prefix-sum forms (the one-matmul form of ``chunked``, :class:`_NarrowChunked`,
and ``scan``'s K = 1 form): there each pair's decay exp(b_i - b_j) is the product
exp(b_i) exp(-b_j) of the chunk's own prefix sums b, and the key factor, at most
exp(40) ~ 2e17, is far from overflow even in float32. Calls with a chunk decaying further
(gates near 0) take the forms whose exponents are all <= 0: in ``chunked`` the halving form
for vector gates and the decay-matrix form for scalar ones, in ``scan`` its steps."""


def _per_head(x: torch.Tensor, H: int) -> torch.Tensor:
    """q or k (B, T, Hk, K) repeated to H heads (head h reads head h // (H / Hk))."""
    return x if x.shape[2] == H else x.repeat_interleave(H // x.shape[2], dim=2)


def _initial(state, shape, acc, device) -> torch.Tensor:
    return torch.zeros(shape, dtype=acc, device=device) if state is None else state.to(acc)


def _decays_within(log_g: torch.Tensor, C: int, span: float) -> bool:
    """Whether every chunk of C positions (along dim 1) sums its log gates to at least -span
    (per head and key dim). Settled by the smallest gate alone where C of it stay within span
    (one contiguous pass; the chunk sums read a transposed layout, which is slower)."""
    if log_g.numel() and float(log_g.detach().min()) * C >= -span:
        return True
    pad = -log_g.shape[1] % C
    x = F.pad(log_g, (0, 0) * (log_g.dim() - 2) + (0, pad)) if pad else log_g
    return bool(x.unflatten(1, (-1, C)).sum(2).min() >= -span)


def _entering(U: torch.Tensor, gamma: torch.Tensor, S0, reverse: bool = False,
              dim: int = -3) -> tuple[torch.Tensor, torch.Tensor]:
    """Across chunks: the states entering each chunk, E (..., n, K, V), with E_0 = S0 and
    E_{c+1} = gamma_c * E_c + U_c (gamma broadcast to (..., n, K | 1, 1 | V)), and the state
    leaving the last chunk. ``reverse``: the adjoints leaving each chunk, E_{n-1} = S0 (0 for
    None) and E_{c-1} = gamma_c * E_c + U_c, and the adjoint entering the first. ``dim``: where
    the chunks lie in U and gamma (the states are the dims after it). Each step writes its slot
    in place (no separately made state to copy in)."""
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
