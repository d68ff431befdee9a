"""Block-local (chunked) attention: causal softmax attention inside fixed blocks of tokens.

The sequence is cut at absolute positions 0, b, 2b, ... (b = ``block_size``); a query attends
causally to the keys of its own block only:

    query at position t sees keys s with s <= t and s // b == t // b

as in the "chunked attention" of Llama 4's local layers. Cost O(T·b); no token reaches across a
boundary, so the blocks exchange information only through the other layers.

Projections, GQA, RoPE (absolute positions), qk-norm and output gate are those of the
``attention`` block (:class:`blocks.common.SoftmaxAttention`); the mask goes to
``op("attention")`` as ``block_size``.

State: a :class:`blocks.common.KVCache` of b slots holding the keys and values of the block
of the last token seen.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from blocks.common import SoftmaxAttention, SoftmaxAttentionSpec, window_problem
from composer.core.registry import register_block


class BlockAttentionSpec(SoftmaxAttentionSpec):
    """Block-local attention settings (plus those shared by every softmax-attention block)."""

    kind: Literal["block_attention"] = "block_attention"
    block_size: int = Field(64, ge=1)
    """b: tokens per block; a query sees the earlier tokens of its own block."""

    def problems(self, d_model, max_seq_len):
        return (super().problems(d_model, max_seq_len)
                + window_problem("block_size", self.block_size, max_seq_len, "block"))


@register_block("block_attention", spec=BlockAttentionSpec, role="mixer", symbol="B",
                summary="block-local causal attention inside fixed blocks of block_size tokens")
class BlockAttention(SoftmaxAttention):
    """Causal attention within aligned blocks of ``block_size`` tokens (GQA, RoPE, gate)."""

    def init_state(self, batch, device, dtype):
        return self.cache(batch, device, dtype, "block", self.spec.block_size)

    def mask(self):
        return {"block_size": self.spec.block_size}

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        # a query at offset r of its block sees r + 1 keys
        b = spec.block_size
        full, rest = divmod(T, b)
        keys = (full * b * (b + 1) / 2 + rest * (rest + 1) / 2) / T
        return cls.projection_flops(spec, d_model) + cls.mixing_flops(spec, d_model, keys)

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        """The largest cache over T tokens: min(T, b) positions (a step writes its token
        into the block's b slots before attending)."""
        return cls.cache_bytes(spec, d_model, min(T, spec.block_size), dtype_bytes)
