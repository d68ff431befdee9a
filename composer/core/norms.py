"""RMSNorm with a hand-written backward, shared by the model's residual norms and the blocks.

    y = x / sqrt(mean(x^2) + eps) * w            over the last dim (or the last w.dim() dims'
                                                 rows: w may be (groups, width))

Normalised in at least float32 and cast back to x's dtype (the Gemma 3 / Qwen3-Next / Mamba-2
convention). Autograd through the composite (square, mean, rsqrt, two products) spends about ten
passes over x in forward + backward and a zero-filled buffer per product; this one spends six:
forward x̂ = x·r and y = x̂·w; backward dw = Σ g·x̂ and dx = r·(g·w − x̂·mean(g·w·x̂)).
Timings: docs/design.md, "RMSNorm and RoPE with hand-written backwards".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps: float):
        work = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(work)
        n = x.shape[-1]
        rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(n).add_(eps)
        rstd = rstd.rsqrt_()
        # contiguous whatever x's layout (an op's head-major output seen as (B, T, H, D)), so
        # that merging the heads afterwards is a view rather than a copy
        xhat = torch.mul(xf, rstd, out=torch.empty(x.shape, dtype=work, device=x.device))
        ctx.save_for_backward(xhat, rstd, w)
        ctx.x_dtype = x.dtype
        y = xhat if w is None else xhat * w.to(work)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, w = ctx.saved_tensors
        g = g.to(xhat.dtype)
        dx = dw = None
        if w is not None and ctx.needs_input_grad[1]:
            dw = (g * xhat).reshape(-1, *w.shape).sum(0).to(w.dtype)
        if ctx.needs_input_grad[0]:
            gw = g if w is None else g * w.to(xhat.dtype)
            mean = torch.linalg.vecdot(gw, xhat, dim=-1).unsqueeze(-1).div_(xhat.shape[-1])
            dx = torch.addcmul(gw, xhat, mean, value=-1).mul_(rstd).to(ctx.x_dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of x over its last dim, times ``weight`` (None: no scale).

    ``weight`` has the shape of x's trailing dims (usually (D,); (groups, D / groups) for a
    grouped norm over x viewed as (..., groups, D / groups)).
    """
    if weight is not None and tuple(weight.shape) != tuple(x.shape[x.dim() - weight.dim():]):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the trailing "
                         f"dims of x {tuple(x.shape)}")
    if (not torch.is_grad_enabled() and x.dtype in (torch.float32, torch.float64)
            and (weight is None or weight.dtype == x.dtype)):
        # no backward to prepare for (generation, evaluation): PyTorch's fused kernel, one op
        # instead of eight, computing the same formula in x's dtype
        if weight is None or weight.dim() == 1:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return F.rms_norm(x, (x.shape[-1],), None, eps) * weight       # grouped: (g, D / g)
    return _RMSNorm.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """Drop-in for ``torch.nn.RMSNorm(d, eps)`` (same ``weight`` parameter, so checkpoints load
    either way) running :func:`rms_norm`."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
