"""Gated short convolution: Zoology's BaseConv (Arora et al. 2023, arXiv 2312.04927).

    u = x W + b                          a projection, (B, T, D)
    c = conv_k(x)                        causal depthwise convolution, k taps per channel, bias
    y = u ⊙ c

The mixer Zoology pairs with every sequence mixer in its associative-recall experiments: a
token sees itself and the k - 1 tokens before it, so the next layer can match "the token after
key k" to a query of k (the binding that attention alone learns slowly). Pattern symbol ``C``:
``C*C*`` is Zoology's two-layer attention model, ``CMMM*`` a conv in front of a hybrid.

State: ``{"conv": (B, D, k - 1)}``, the last k - 1 inputs, constant in T.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from blocks.common import causal_conv
from composer.core.block import Block, BlockSpec, linear_flops
from composer.core.registry import register_block


class BaseConvSpec(BlockSpec):
    """Gated short convolution settings."""

    kind: Literal["base_conv"] = "base_conv"
    kernel_size: int = Field(3, ge=2)
    """Taps of the causal convolution: a token sees itself and kernel_size - 1 before it
    (Zoology: 3)."""


@register_block("base_conv", spec=BaseConvSpec, role="mixer", symbol="C",
                summary="gated short causal convolution (Zoology's BaseConv)")
class BaseConv(Block):
    """y = (x W + b) ⊙ conv_k(x), the convolution causal and depthwise."""

    def __init__(self, spec: BaseConvSpec, d_model: int):
        super().__init__(spec, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.conv = nn.Conv1d(d_model, d_model, spec.kernel_size, groups=d_model)

    def init_state(self, batch, device, dtype):
        return {"conv": torch.zeros(batch, self.d_model, self.spec.kernel_size - 1,
                                    device=device, dtype=dtype)}

    def forward(self, x, state=None):
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        c, conv_state = causal_conv(self.conv, x, state["conv"])
        return self.proj(x) * c, {"conv": conv_state}

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        # projection, k multiply-adds per channel, the gate product
        return linear_flops((d_model, d_model)) + 2 * spec.kernel_size * d_model + d_model

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        return d_model * (spec.kernel_size - 1) * dtype_bytes
