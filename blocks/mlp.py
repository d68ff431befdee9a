"""Position-wise feed-forward blocks: gated (SwiGLU, GeGLU; Shazeer 2020) or plain (GELU).

Gated: out = W_down(act(W_gate x) * W_up x); plain: out = W_down(act(W_up x)).
Default hidden width: 8/3 d_model rounded up to a multiple of 64 for gated FFNs (the parameter
count of a 4 d_model plain FFN, as in Llama), 4 d_model for plain ones.

The computation and its spec (:class:`blocks.common.FeedForward`, :class:`MLPSpec`) live in
``blocks/common.py``, since MoE experts run the same FFN; this module registers them.
"""
from __future__ import annotations

from blocks.common import FeedForward, MLPSpec
from composer.core.registry import register_block


@register_block("mlp", spec=MLPSpec, role="ffn", symbol="-",
                summary="gated (SwiGLU/GeGLU) or plain feed-forward")
class MLP(FeedForward):
    """Feed-forward sub-layer; no sequence state."""
