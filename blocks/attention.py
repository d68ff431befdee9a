"""Causal softmax attention: global or sliding-window, GQA/MQA, RoPE, qk-norm, output gate.

Glossary: Hq query heads, Hkv key/value heads (GQA groups; Hkv = 1 is MQA), D head dim,
w window (a query sees itself and the w - 1 tokens before it).

    q, k, v = x W_q, x W_k, x W_v                       per head, (B, H, T, D)
    q, k = rmsnorm(q), rmsnorm(k)                       qk_norm, over D (Dehghani et al. 2023)
    q, k = rope(q), rope(k)                             Su et al. 2021, first rope_fraction of D
    y = softmax(q k^T · scale + mask) v                 scale: D^-1/2 unless set
    y = y ⊙ sigmoid(g),  g = x W_g                      output_gate (Qwen3-Next)
    out = y W_o

RoPE pairs dims (i, i + r/2) of the r rotated ones, as GPT-NeoX / Llama / Gemma / Qwen do.
``qk_norm: rms_offset`` is Gemma 3's and Qwen3-Next's RMSNorm, scaled by (1 + weight) with the
weight starting at 0 (so weight decay pulls the scale towards 1). With ``output_gate`` the query
projection yields [query | gate] per head, Qwen3-Next's layout, so its weights copy straight in.

:class:`blocks.common.SoftmaxAttention` holds what every attention block shares (projections,
norms, RoPE, gate); ``block_attention`` and ``sparse_attention`` reuse it with their own mask
and cache.

State: a :class:`blocks.common.KVCache`: every position (global), or a ring of the last w
positions (window), so memory stays constant during generation; written in place.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from blocks.common import SoftmaxAttention, SoftmaxAttentionSpec, mean_visible, window_problem
from composer.core.registry import register_block


class AttentionSpec(SoftmaxAttentionSpec):
    """Softmax attention settings."""

    kind: Literal["attention"] = "attention"
    window: int | None = Field(None, ge=1)
    """Sliding window length; null: global attention."""

    def problems(self, d_model, max_seq_len):
        out = super().problems(d_model, max_seq_len)
        if self.window is not None:
            out += window_problem("window", self.window, max_seq_len, "window")
        return out


@register_block("attention", spec=AttentionSpec, role="mixer", symbol="*",
                summary="causal softmax attention (global / sliding window, GQA, RoPE, gate)")
class Attention(SoftmaxAttention):
    """Causal multi-head attention with GQA, RoPE, qk-norm, output gate, optional window."""

    def init_state(self, batch, device, dtype):
        w = self.spec.window
        return self.cache(batch, device, dtype, *(("global", None) if w is None
                                                   else ("window", w)))

    def mask(self):
        return {"window": self.spec.window}

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        # a causal query at position t sees min(t + 1, w) keys; mean over t = 1..T
        return (cls.projection_flops(spec, d_model)
                + cls.mixing_flops(spec, d_model, mean_visible(T, spec.window)))

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        kept = T if spec.window is None else min(T, spec.window)   # the ring: w slots
        return cls.cache_bytes(spec, d_model, kept, dtype_bytes)

