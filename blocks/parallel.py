"""Parallel branches inside one residual sub-layer (Hymba, Falcon-H1).

The sub-layer feeds the same normalised input to every branch (any registered mixers, named in
``branches``) and adds the combination of their outputs to the residual stream:

    h = x + combine(b_1(norm(x)), ..., b_n(norm(x)))
    combine = mean_i beta_i * rmsnorm_i(b_i)   (Hymba, Dong et al. 2024, eq. 5: normalised
                                               outputs with learned per-channel scales)

The layer graph draws each branch as its own node between the fork and this combine node.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from composer.core.block import Block, BlockSpec
from composer.core.norms import RMSNorm
from composer.core.registry import register_block


class ParallelSpec(BlockSpec):
    """Branches run side by side on the same input."""

    kind: Literal["parallel"] = "parallel"
    branches: list[str] = Field(min_length=2)
    """Block names of the branches (e.g. [attention, mamba2])."""
    combine: Literal["mean", "sum"] = "mean"
    """How branch outputs are combined after their norms and scales."""
    norm_outputs: bool = True
    """RMS-normalise each branch output before scaling (Hymba); false: scale only."""


@register_block("parallel", spec=ParallelSpec, role="composite", symbol="P",
                summary="parallel branches (attention heads beside SSM heads), combined")
class ParallelCombine(Block):
    """The combine step of a parallel sub-layer: per-branch norm and scale, then mean or sum."""

    def __init__(self, spec: ParallelSpec, d_model: int):
        super().__init__(spec, d_model)
        n = len(spec.branches)
        self.norms = nn.ModuleList(RMSNorm(d_model, eps=1e-5) if spec.norm_outputs
                                   else nn.Identity() for _ in range(n))
        self.beta = nn.Parameter(torch.ones(n, d_model))

    def forward(self, outputs: list[torch.Tensor], state=None):
        y = sum(self.beta[i] * self.norms[i](o) for i, o in enumerate(outputs))
        return (y / len(outputs) if self.spec.combine == "mean" else y), None

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        per = (4 if spec.norm_outputs else 0) + 2  # norm (square, mean, scale) + scale, add
        return float(len(spec.branches) * per * d_model)
