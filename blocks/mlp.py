"""Position-wise feed-forward blocks: gated (SwiGLU, GeGLU; Shazeer 2020) or plain (GELU).

Gated: out = W_down(act(W_gate x) * W_up x); plain: out = W_down(act(W_up x)).
Default hidden width: 8/3 d_model rounded up to a multiple of 64 for gated FFNs (the parameter
count of a 4 d_model plain FFN, as in Llama), 4 d_model for plain ones.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from composer.core.block import Block, BlockSpec, linear_flops
from composer.core.registry import register_block

_ACT = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu}


class MLPSpec(BlockSpec):
    """FFN settings."""

    kind: Literal["mlp"] = "mlp"
    activation: Literal["swiglu", "geglu", "gelu"] = "swiglu"
    """swiglu / geglu (gated) or gelu (plain)."""
    d_ff: int | None = Field(None, ge=1)
    """Hidden width; null: 8/3 d_model (gated, rounded up to 64) or 4 d_model (plain)."""
    bias: bool = False
    """Biases in the projections."""

    def gated(self) -> bool:
        return self.activation != "gelu"

    def hidden(self, d_model: int) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.gated():
            return -(-(8 * d_model // 3) // 64) * 64
        return 4 * d_model


@register_block("mlp", spec=MLPSpec, role="ffn", symbol="-",
                summary="gated (SwiGLU/GeGLU) or plain feed-forward")
class MLP(Block):
    """Feed-forward sub-layer; no sequence state."""

    def __init__(self, spec: MLPSpec, d_model: int):
        super().__init__(spec, d_model)
        h = spec.hidden(d_model)
        self.act = _ACT[spec.activation]
        self.up = nn.Linear(d_model, h, bias=spec.bias)
        self.gate = nn.Linear(d_model, h, bias=spec.bias) if spec.gated() else None
        self.down = nn.Linear(h, d_model, bias=spec.bias)

    def forward(self, x, state=None):
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(h), None

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        h = spec.hidden(d_model)
        n_in = 2 if spec.gated() else 1
        return linear_flops(*[(d_model, h)] * n_in, (h, d_model))
