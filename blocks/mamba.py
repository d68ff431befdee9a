"""Mamba (S6) mixer, pure PyTorch. Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces" (arXiv 2312.00752), section 3 and Algorithm 2.

Glossary (paper -> code): D = d_inner = expand * d_model channels, each its own SSM;
N = d_state; Delta = dt (per channel and token, through a rank-R bottleneck, R = dt_rank);
A (D x N) < 0 fixed per channel and state; B_t, C_t (N) per token, shared by the channels.

    [x, z] = in_proj(u)
    x = silu(causal_conv1d(x))                        depthwise, d_conv taps
    [dt_low, B, C] = x_proj(x);   dt = softplus(dt_proj(dt_low) + dt_bias)
    h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t^T    h: (D, N)
    y_t = h_t C_t + D_skip * x_t
    out = out_proj(y * silu(z))

The scan is the shared ``gated_linear_recurrence`` op with one head per channel: q = C and
k = B shared by the D heads, K = N, V = 1, v = dt * x and the log gate dt * A given factored
(``log_g=dt, A=A``), so no (T, D, N) gate tensor is built; ``auto`` runs it on the ``scan``
backend (blocks/ops/scan.py), which takes exactly that shape. ``dt_bias`` is a parameter of
its own, not dt_proj's bias, so that the model-wide Linear initialisation keeps the dt
initialisation (Hugging Face's ``dt_proj.bias`` loads into it).
State: ``{"conv": (B, D, d_conv - 1), "ssm": (B, D, N)}``, constant in T.
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
from composer.core.registry import register_block


class MambaSpec(BlockSpec):
    """Mamba-1 settings (defaults of mamba_ssm's Mamba and Hugging Face's MambaConfig)."""

    kind: Literal["mamba"] = "mamba"
    d_state: int = Field(16, ge=1)
    """N: state size per channel."""
    d_conv: int = Field(4, ge=1)
    """Width of the causal depthwise convolution."""
    expand: int = Field(2, ge=1)
    """d_inner = expand * d_model."""
    dt_rank: int | None = Field(None, ge=1)
    """R: rank of the dt projection; null: ceil(d_model / 16)."""
    dt_min: float = Field(0.001, gt=0)
    """Smallest initial step dt."""
    dt_max: float = Field(0.1, gt=0)
    """Largest initial step dt."""
    dt_init_floor: float = Field(1e-4, gt=0)
    """Initial dt values are clamped to at least this."""
    conv_bias: bool = True
    """Bias in the convolution."""
    bias: bool = False
    """Biases in in_proj / out_proj."""
    chunk_size: int = Field(64, ge=1)
    """Chunk length of the chunked scan."""

    def rank(self, d_model: int) -> int:
        return self.dt_rank or math.ceil(d_model / 16)

    def problems(self, d_model, max_seq_len):
        if self.dt_min > self.dt_max:
            return [("dt_min", self.dt_min, f"dt_min exceeds dt_max {self.dt_max}", "swap them")]
        return []


@register_block("mamba", spec=MambaSpec, role="mixer", symbol="m",
                summary="Mamba-1 selective state space (S6), chunk-parallel scan")
class Mamba(Block):
    """Mamba-1 mixer: a selective diagonal state space per channel."""

    def __init__(self, spec: MambaSpec, d_model: int):
        super().__init__(spec, d_model)
        self.d_inner = spec.expand * d_model
        self.R = spec.rank(d_model)
        N = spec.d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=spec.bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, spec.d_conv, groups=self.d_inner,
                                bias=spec.conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.R, self.d_inner, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.d_inner))
        self.A_log = nn.Parameter(torch.empty(self.d_inner, N))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=spec.bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """S4D-real A = -(1..N) per channel; dt log-uniform in [dt_min, dt_max] through
        softplus^-1 in dt_bias; D = 1 (the paper's initialisation)."""
        if self.dt_bias.is_meta:
            return
        s = self.spec
        A = torch.arange(1, s.d_state + 1, dtype=torch.float32).expand(self.d_inner, -1)
        self.A_log.copy_(A.log())
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(s.dt_max) - math.log(s.dt_min))
                       + math.log(s.dt_min)).clamp(min=s.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def init_state(self, batch, device, dtype):
        s = self.spec
        return {"conv": torch.zeros(batch, self.d_inner, s.d_conv - 1, device=device,
                                    dtype=dtype),
                # the scan state stays in fp32 (fp64 when asked) even for bf16 activations
                "ssm": torch.zeros(batch, self.d_inner, s.d_state, device=device,
                                   dtype=accum_dtype(dtype))}

    def forward(self, u, state=None):
        s = self.spec
        B_, T, _ = u.shape
        if state is None:
            state = self.init_state(B_, u.device, u.dtype)
        x, z = self.in_proj(u).chunk(2, dim=-1)                              # (B, T, D) each
        x, conv_state = causal_conv(self.conv1d, x, state["conv"])
        x = F.silu(x)                                                         # (B, T, D)
        dt, Bm, Cm = self.x_proj(x).split([self.R, s.d_state, s.d_state], dim=-1)
        acc = state["ssm"].dtype
        dt = F.softplus(self.dt_proj(dt).to(acc) + self.dt_bias.to(acc))      # (B, T, D)
        A = -torch.exp(self.A_log.to(acc))                                    # (D, N)
        # D heads sharing k = B and q = C, K = d_state, V = 1, log gate dt * A per state
        y, ssm = op("gated_linear_recurrence")(
            Cm.to(acc)[:, :, None], Bm.to(acc)[:, :, None], (dt * x.to(acc))[..., None], dt,
            state["ssm"][..., None], chunk_size=s.chunk_size, A=A)
        y = (y[..., 0] + x.to(acc) * self.D.to(acc)) * F.silu(z.to(acc))
        return self.out_proj(y.to(u.dtype)), {"conv": conv_state, "ssm": ssm[..., 0].to(acc)}

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        d_inner, R, N = spec.expand * d_model, spec.rank(d_model), spec.d_state
        proj = linear_flops((d_model, 2 * d_inner), (d_inner, R + 2 * N), (R, d_inner),
                            (d_inner, d_model))
        conv = 2 * d_inner * spec.d_conv
        # per channel and state: exp(dt A) (2), decay h (1), add dt x B (2), read h C (2)
        return proj + conv + 7 * d_inner * N

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        d_inner = spec.expand * d_model
        return d_inner * (spec.d_conv - 1 + spec.d_state) * dtype_bytes
