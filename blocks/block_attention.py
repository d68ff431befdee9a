"""Block-local (chunked) attention: causal softmax attention inside fixed blocks of tokens.

The sequence is cut at absolute positions 0, b, 2b, ... (b = ``block_size``); a query attends
causally to the keys of its own block only:

    query at position t sees keys s with s <= t and s // b == t // b

as in the "chunked attention" of Llama 4's local layers. Cost O(T·b); no token reaches across a
boundary, so the blocks exchange information only through the other layers.

Projections, GQA, RoPE (absolute positions), qk-norm and output gate are those of the
``attention`` block (:class:`blocks.common.SoftmaxAttention`); the mask goes to
``op("attention")`` as ``block_size``.

State: ``{"k", "v", "pos"}``, the keys and values of the current, unfinished block
(pos mod b positions, at most b - 1).
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

    def forward(self, x, state=None):
        T, b = x.shape[1], self.spec.block_size
        pos0 = 0 if state is None else state["pos"]
        q, k, v, gate = self.project(x, pos0)
        k = self.extend(None if state is None else state["k"], k)      # (B, Hkv, Tc + T, hd)
        v = self.extend(None if state is None else state["v"], v)
        y = self.attend(q, k, v, q_pos0=pos0, k_pos0=pos0 + T - k.shape[2], block_size=b)
        keep = (pos0 + T) % b                                           # the open block
        new_state = {"k": k[:, :, k.shape[2] - keep:], "v": v[:, :, v.shape[2] - keep:],
                     "pos": pos0 + T}
        return self.output(y, gate), new_state

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        # a query at offset r of its block sees r + 1 keys
        b = spec.block_size
        full, rest = divmod(T, b)
        keys = (full * b * (b + 1) / 2 + rest * (rest + 1) / 2) / T
        return cls.projection_flops(spec, d_model) + cls.mixing_flops(spec, d_model, keys)

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        """The largest cache over T tokens: min(T, b - 1) positions."""
        return cls.cache_bytes(spec, d_model, min(T, spec.block_size - 1), dtype_bytes)
