"""Mamba-2 (SSD) mixer, pure PyTorch. Dao & Gu 2024, "Transformers are SSMs" (arXiv 2405.21060).

Glossary (paper -> code): d_inner = expand * d_model; H heads of P = head_dim channels;
N = d_state; G = n_groups sharing B and C; per head a scalar A < 0 and step dt > 0.

    [z, xBC, dt] = in_proj(u)
    xBC = silu(causal_conv1d(xBC));  [x, B, C] = xBC
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          (h: P x N per head)
    y_t = h_t C_t + D x_t
    out = out_proj(rmsnorm(y * silu(z)))                 (norm per group of d_inner / G)

The scan is the ``gated_linear_recurrence`` op with q = C, k = B, v = dt * x, log g = dt * A;
the G groups are the op's shared q/k heads. With Hugging Face's Mamba2Mixer weights (its
``norm.weight`` is our ``norm_weight``) the outputs match its torch path: the same in_proj
layout, the gate applied before the norm (norm_before_gate=False), dt clamped to ``dt_limit``
(its time_step_limit) and ``norm_eps`` (its layer_norm_epsilon).
State: ``{"conv": (B, conv_dim, d_conv - 1), "ssm": (B, H, N, P)}``, constant in T.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from blocks.common import causal_conv
from composer.core.block import Block, BlockSpec, accum_dtype, linear_flops
from composer.core.kernels import op
from composer.core.norms import rms_norm
from composer.core.registry import register_block


class Mamba2Spec(BlockSpec):
    """Mamba-2 settings (defaults of mamba_ssm's Mamba2 except head_dim and chunk_size, sized
    for small CPU models)."""

    kind: Literal["mamba2"] = "mamba2"
    d_state: int = Field(64, ge=1)
    """N: state size per head."""
    d_conv: int = Field(4, ge=1)
    """Width of the causal depthwise convolution."""
    expand: int = Field(2, ge=1)
    """d_inner = expand * d_model."""
    head_dim: int = Field(32, ge=1)
    """P: channels per head; heads = d_inner / head_dim."""
    n_groups: int = Field(1, ge=1)
    """Groups of heads sharing B and C (like GQA)."""
    chunk_size: int = Field(64, ge=1)
    """Chunk length of the chunked scan."""
    dt_min: float = Field(0.001, gt=0)
    """Smallest initial step dt."""
    dt_max: float = Field(0.1, gt=0)
    """Largest initial step dt."""
    A_init_min: float = Field(1.0, gt=0)
    """A is initialised as -uniform(A_init_min, A_init_max) per head."""
    A_init_max: float = Field(16.0, gt=0)
    """See A_init_min."""
    dt_limit: tuple[float, float] | None = None
    """Clamp dt = softplus(.) into [low, high] (Hugging Face's time_step_limit); null: none."""
    norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of the gated RMSNorm."""
    conv_bias: bool = True
    """Bias in the convolution."""
    bias: bool = False
    """Biases in in_proj / out_proj."""

    def problems(self, d_model, max_seq_len):
        out = []
        d_inner = self.expand * d_model
        if d_inner % self.head_dim:
            out.append(("head_dim", self.head_dim, f"d_inner = expand * d_model = {d_inner} is "
                        f"not divisible by head_dim {self.head_dim}",
                        "pick a head_dim dividing expand * d_model"))
        elif (d_inner // self.head_dim) % self.n_groups:
            out.append(("n_groups", self.n_groups, f"{d_inner // self.head_dim} heads cannot be "
                        f"split into {self.n_groups} groups", "use a divisor of the head count"))
        if self.dt_min > self.dt_max:
            out.append(("dt_min", self.dt_min, f"dt_min exceeds dt_max {self.dt_max}",
                        "swap them"))
        if self.dt_limit is not None and not 0 <= self.dt_limit[0] <= self.dt_limit[1]:
            out.append(("dt_limit", self.dt_limit, "needs 0 <= low <= high",
                        "give [low, high] with 0 <= low <= high, or null"))
        if self.A_init_min > self.A_init_max:
            out.append(("A_init_min", self.A_init_min, f"exceeds A_init_max {self.A_init_max}",
                        "swap them"))
        return out


def _dims(spec: Mamba2Spec, d_model: int):
    d_inner = spec.expand * d_model
    H = d_inner // spec.head_dim
    conv_dim = d_inner + 2 * spec.n_groups * spec.d_state
    return d_inner, H, conv_dim


@register_block("mamba2", spec=Mamba2Spec, role="mixer", symbol="M",
                summary="Mamba-2 selective state space (SSD), chunked scan")
class Mamba2(Block):
    """Mamba-2 mixer: input-dependent scalar-decay state space per head."""

    def __init__(self, spec: Mamba2Spec, d_model: int):
        super().__init__(spec, d_model)
        self.d_inner, self.H, self.conv_dim = _dims(spec, d_model)
        GN = spec.n_groups * spec.d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * GN + self.H, bias=spec.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, spec.d_conv, groups=self.conv_dim,
                                bias=spec.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.empty(self.H))
        self.norm_weight = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=spec.bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """dt log-uniform in [dt_min, dt_max] stored through softplus^-1; A, D, norm as Mamba-2."""
        if self.dt_bias.is_meta:
            return
        s = self.spec
        dt = torch.exp(torch.rand(self.H) * (math.log(s.dt_max) - math.log(s.dt_min))
                       + math.log(s.dt_min)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.empty(self.H).uniform_(s.A_init_min, s.A_init_max).log())
        self.D.fill_(1.0)
        self.norm_weight.fill_(1.0)

    def init_state(self, batch, device, dtype):
        s = self.spec
        return {"conv": torch.zeros(batch, self.conv_dim, s.d_conv - 1, device=device,
                                    dtype=dtype),
                # the scan state stays in fp32 (fp64 when asked) even for bf16 activations
                "ssm": torch.zeros(batch, self.H, s.d_state, s.head_dim, device=device,
                                   dtype=accum_dtype(dtype))}

    def forward(self, u, state=None):
        s = self.spec
        B_, T, _ = u.shape
        if state is None:
            state = self.init_state(B_, u.device, u.dtype)
        zxbcdt = self.in_proj(u)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.H], dim=-1)
        xBC, conv_state = causal_conv(self.conv1d, xBC, state["conv"])
        xBC = F.silu(xBC)                                                    # (B, T, conv_dim)
        GN = s.n_groups * s.d_state
        x, Bm, Cm = xBC.split([self.d_inner, GN, GN], dim=-1)
        Bm = Bm.view(B_, T, s.n_groups, s.d_state)                                # (B,T,G,N)
        Cm = Cm.view(B_, T, s.n_groups, s.d_state)
        x = x.reshape(B_, T, self.H, s.head_dim)                                  # (B,T,H,P)
        acc = state["ssm"].dtype
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))                         # (B,T,H)
        if s.dt_limit is not None:
            dt = dt.clamp(*s.dt_limit)
        A = -torch.exp(self.A_log.to(acc))                                         # (H,)
        y, ssm = op("gated_linear_recurrence")(
            Cm.to(acc), Bm.to(acc), x.to(acc) * dt[..., None], dt * A, state["ssm"],
            chunk_size=s.chunk_size)
        y = y + x.to(acc) * self.D.to(acc)[:, None]
        y = y.reshape(B_, T, self.d_inner)
        y = self._gated_norm(y, z.to(acc)).to(u.dtype)
        return self.out_proj(y), {"conv": conv_state, "ssm": ssm.to(acc)}

    def _gated_norm(self, y, z):
        """rmsnorm(y * silu(z)) over groups of d_inner / n_groups channels, times a weight."""
        g = self.spec.n_groups
        h = (y * F.silu(z)).view(*y.shape[:-1], g, self.d_inner // g)
        w = self.norm_weight.view(g, self.d_inner // g)
        return rms_norm(h, w, self.spec.norm_eps).view_as(y)

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        d_inner, H, conv_dim = _dims(spec, d_model)
        GN = spec.n_groups * spec.d_state
        proj = linear_flops((d_model, 2 * d_inner + 2 * GN + H), (d_inner, d_model))
        conv = 2 * conv_dim * spec.d_conv
        # recurrent form per head: decay h (1), add outer product x B^T (2), read h C (2)
        scan = 5 * H * spec.d_state * spec.head_dim
        return proj + conv + scan

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        d_inner, H, conv_dim = _dims(spec, d_model)
        return (conv_dim * (spec.d_conv - 1) + H * spec.d_state * spec.head_dim) * dtype_bytes
