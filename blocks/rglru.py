"""Griffin's recurrent block with the RG-LRU: De et al. 2024, "Griffin: Mixing Gated Linear
Recurrences with Local Attention for Efficient Language Models" (arXiv 2402.19427), section 2.4,
laid out as in RecurrentGemma (Hugging Face's RecurrentGemmaRecurrentBlock parameter shapes).

Glossary (paper -> code): D_RNN = ``lru_width`` channels; the gate matrices W_a, W_x are
block-diagonal with ``n_heads`` blocks; Lambda = -``recurrent_param`` (a = sigmoid(Lambda));
c = ``gate_scale`` (8 in the paper).

    y = gelu(W_y x)                                   gate branch
    x' = conv1d(W_x x)                                causal depthwise, d_conv taps
    r_t = sigmoid(W_a x'_t + b_a),  i_t = sigmoid(W_x x'_t + b_x)
    log a_t = -c r_t softplus(-Lambda)                (a_t = a^(c r_t), in (0, 1))
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x'_t)
    out = W_o (h * y)

At absolute position 0 the input is not scaled by sqrt(1 - a_t^2) (RecurrentGemma's reset at
a sequence start; h_{-1} = 0 there anyway). The derivative of that square root is bounded by
1000, as in the paper's code, so gates near a = 1 do not blow up gradients.
The scan is the shared ``gated_linear_recurrence`` op with one head per channel, K = V = 1,
q = k = 1, v = the scaled input and the scalar log gate log a_t (``auto``: the ``scan``
backend).
State: ``{"conv": (B, D_RNN, d_conv - 1), "h": (B, D_RNN, 1), "pos": int}``, constant in T.
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

MAX_SQRT_GRADIENT = 1000.0


class _SqrtBoundedGrad(torch.autograd.Function):
    """sqrt(x) whose derivative 1 / (2 sqrt(x)) is capped at MAX_SQRT_GRADIENT."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sqrt()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (2 * x.clamp_min(0.25 / MAX_SQRT_GRADIENT ** 2).sqrt())


class RGLRUSpec(BlockSpec):
    """RG-LRU recurrent block settings (RecurrentGemma's defaults where they apply)."""

    kind: Literal["rglru"] = "rglru"
    lru_width: int | None = Field(None, ge=1)
    """D_RNN: channels of the recurrence; null: d_model."""
    n_heads: int = Field(4, ge=1)
    """Blocks of the block-diagonal gate matrices."""
    d_conv: int = Field(4, ge=1)
    """Width of the causal depthwise convolution."""
    gate_scale: float = Field(8.0, gt=0)
    """c: log a_t = -c r_t softplus(-Lambda)."""
    a_min: float = Field(0.9, gt=0, lt=1)
    """a = sigmoid(Lambda) is initialised uniformly in a^2 from a_min^2 to a_max^2."""
    a_max: float = Field(0.999, gt=0, lt=1)
    """See a_min."""
    chunk_size: int = Field(32, ge=1)
    """Chunk length of the chunked scan; short, since its steps hold only B x width numbers
    and per-call overhead rules."""

    def width(self, d_model: int) -> int:
        return self.lru_width or d_model

    def problems(self, d_model, max_seq_len):
        out = []
        if self.width(d_model) % self.n_heads:
            out.append(("n_heads", self.n_heads, f"lru_width {self.width(d_model)} is not "
                        f"divisible by n_heads {self.n_heads}", "pick a divisor of lru_width"))
        if self.a_min > self.a_max:
            out.append(("a_min", self.a_min, f"exceeds a_max {self.a_max}", "swap them"))
        return out


@register_block("rglru", spec=RGLRUSpec, role="mixer", symbol="r",
                summary="Griffin / RecurrentGemma RG-LRU recurrent block")
class RGLRU(Block):
    """Griffin's recurrent block: a gated, real, diagonal linear recurrence per channel."""

    def __init__(self, spec: RGLRUSpec, d_model: int):
        super().__init__(spec, d_model)
        W, H = spec.width(d_model), spec.n_heads
        self.W, self.H = W, H
        self.linear_y = nn.Linear(d_model, W)
        self.linear_x = nn.Linear(d_model, W)
        self.linear_out = nn.Linear(W, d_model)
        self.conv_1d = nn.Conv1d(W, W, spec.d_conv, groups=W)
        self.input_gate_weight = nn.Parameter(torch.empty(H, W // H, W // H))
        self.input_gate_bias = nn.Parameter(torch.zeros(H, W // H))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(H, W // H, W // H))
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(H, W // H))
        self.recurrent_param = nn.Parameter(torch.empty(W))
        self.reset_rglru_parameters()

    @torch.no_grad()
    def reset_rglru_parameters(self):
        """Gate blocks ~ N(0, 1 / block width); a^2 ~ U(a_min^2, a_max^2) via softplus^-1."""
        if self.recurrent_param.is_meta:
            return
        s, bw = self.spec, self.W // self.H
        for w in (self.input_gate_weight, self.recurrent_gate_weight):
            w.normal_(0.0, 1.0 / math.sqrt(bw))
        a = torch.empty(self.W).uniform_(s.a_min ** 2, s.a_max ** 2).sqrt()
        self.recurrent_param.copy_(torch.log(1 / a - 1))       # softplus(p) = -log a

    def init_state(self, batch, device, dtype):
        acc = accum_dtype(dtype)
        return {"conv": torch.zeros(batch, self.W, self.spec.d_conv - 1, device=device,
                                    dtype=dtype),
                "h": torch.zeros(batch, self.W, 1, device=device, dtype=acc), "pos": 0}

    def _gate(self, x, weight, bias):
        """sigmoid of the block-diagonal map: x (B, T, W) -> (B, T, W)."""
        xb = x.unflatten(-1, (self.H, self.W // self.H))                     # (B, T, H, bw)
        return torch.sigmoid(torch.einsum("bthi,hij->bthj", xb, weight) + bias).flatten(-2)

    def forward(self, x, state=None):
        s = self.spec
        B_, T, _ = x.shape
        if state is None:
            state = self.init_state(B_, x.device, x.dtype)
        y = F.gelu(self.linear_y(x), approximate="tanh")
        xb = self.linear_x(x)
        xb, conv_state = causal_conv(self.conv_1d, xb, state["conv"])         # (B, T, W)
        acc = state["h"].dtype
        r = self._gate(xb, self.recurrent_gate_weight, self.recurrent_gate_bias).to(acc)
        i = self._gate(xb, self.input_gate_weight, self.input_gate_bias).to(acc)
        neg_log_a = s.gate_scale * r * F.softplus(self.recurrent_param.to(acc))   # -log a_t
        scale = _SqrtBoundedGrad.apply(-torch.expm1(-2 * neg_log_a))          # sqrt(1 - a^2)
        if state["pos"] == 0:
            scale = torch.cat([torch.ones_like(scale[:, :1]), scale[:, 1:]], dim=1)
        u = scale * i * xb.to(acc)
        ones = u.new_ones(B_, T, 1, 1)                      # q = k = 1: K = V = 1, W heads
        h, h_last = op("gated_linear_recurrence")(ones, ones, u[..., None], -neg_log_a,
                                                  state["h"][..., None], chunk_size=s.chunk_size)
        h, h_last = h[..., 0], h_last[..., 0]
        out = self.linear_out(h.to(x.dtype) * y)
        return out, {"conv": conv_state, "h": h_last.to(acc), "pos": state["pos"] + T}

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        W = spec.width(d_model)
        gates = 2 * 2 * W * W // spec.n_heads
        # recurrence per channel: a_t, sqrt(1 - a^2), gating (~10), h update (2)
        return linear_flops((d_model, 2 * W), (W, d_model)) + 2 * W * spec.d_conv + gates + 12 * W

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        return spec.width(d_model) * spec.d_conv * dtype_bytes
