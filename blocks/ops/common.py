"""Helpers shared by several ops (``gated_linear_recurrence`` and ``delta_rule``): for the
chunked forms batched products on views, sums along the chunk dim, the head-major layout; for
the ``step`` forms the shape declaration and a dtype cast that skips no-op calls."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOG2E = 1.4426950408889634
"""log2(e): exponentials are taken as exp2(x log2 e), which torch computes faster than exp, at
the cost of one rounding of x."""


def heads_first(x: torch.Tensor, acc: torch.dtype, pad: int) -> torch.Tensor:
    """(B, T, H, X) -> contiguous (B, H, T + pad, X) in ``acc``, zero-padded at the end, in one
    copy: F.pad with pad = 0 copies into the transposed strides (a copy every matmul would
    repeat), so it runs only where there is padding to add."""
    x = x.to(acc).transpose(1, 2)
    return (F.pad(x, (0, 0, 0, pad)) if pad else x).contiguous()


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for equal batch shapes, as one torch.bmm on views: torch.matmul copies
    (transposed) operands of more than three dims first."""
    batch = a.shape[:-2]
    out = torch.bmm(a.reshape((-1,) + a.shape[-2:]), b.reshape((-1,) + b.shape[-2:]))
    return out.view(batch + out.shape[-2:])


def bmm_add(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b in place (out contiguous), one baddbmm: no temporary product."""
    flat = out.view((-1,) + out.shape[-2:])
    flat.baddbmm_(a.reshape((-1,) + a.shape[-2:]), b.reshape((-1,) + b.shape[-2:]))


def rcumsum(x: torch.Tensor) -> torch.Tensor:
    """sum_{i >= s} x_i along dim -2."""
    return x.flip(-2).cumsum(-2).flip(-2)


def excl_cumsum(x: torch.Tensor) -> torch.Tensor:
    """sum_{j < s} x_j along dim -2 (0 at the first position), written in place rather than
    into a padded copy (faster)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out[..., :1, :] = 0
    torch.cumsum(x[..., :-1, :], -2, out=out[..., 1:, :])
    return out


def one_token(q, *args, **kwargs) -> str | None:
    """T = 1 (one decode step)"""
    if q.shape[1] != 1:
        return (f"it runs one token per call (T = 1, a decode step); this call has "
                f"T = {q.shape[1]}")
    return None


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype``; x itself, without an aten call, where it already is (a decode step
    makes each call once per token)."""
    return x if x.dtype == dtype else x.to(dtype)
