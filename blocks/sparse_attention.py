"""Sparse attention: global tokens plus a sliding window (Longformer / BigBird style, causal).

Longformer (Beltagy et al. 2020) and BigBird (Zaheer et al. 2020) mix a local window with a
few global tokens that see and are seen by everything. In a causal language model a global
token can only be seen by later tokens, so the pattern becomes: the first g tokens of the
sequence (``n_global``) are visible to every later query, on top of a window of w:

    query at position t sees keys s with  0 <= t - s < w   or   s < g (and s <= t)

which is also StreamingLLM's "attention sinks + window" (Xiao et al. 2023): the first tokens
collect attention mass that a plain window would have to put somewhere. Cost O(T·(w + g)).
The pattern is exact and static: every backend computes the same set of pairs, the KV cache
stays constant in size, and the banded kernel of ``op("attention")`` serves it with g extra
keys per query.

Projections, GQA, RoPE (absolute positions), qk-norm and output gate are those of the
``attention`` block (:class:`blocks.common.SoftmaxAttention`).

State: ``{"window": KVCache, "global": KVCache}`` (:class:`blocks.common.KVCache`): a ring of
the last w positions, and the first g positions (kept once seen).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from blocks.common import SoftmaxAttention, SoftmaxAttentionSpec, mean_visible, window_problem
from composer.core.registry import register_block


class SparseAttentionSpec(SoftmaxAttentionSpec):
    """Global tokens + sliding window settings (plus those of every softmax-attention block)."""

    kind: Literal["sparse_attention"] = "sparse_attention"
    window: int = Field(256, ge=1)
    """w: a query sees itself and the w - 1 tokens before it."""
    n_global: int = Field(4, ge=1)
    """g: the first g tokens of the sequence are visible to every later query."""

    def problems(self, d_model, max_seq_len):
        return (super().problems(d_model, max_seq_len)
                + window_problem("window", self.window, max_seq_len, "window"))


@register_block("sparse_attention", spec=SparseAttentionSpec, role="mixer", symbol="X",
                summary="sparse attention: the first n_global tokens plus a sliding window")
class SparseAttention(SoftmaxAttention):
    """Causal attention to a sliding window plus the first ``n_global`` tokens."""

    def init_state(self, batch, device, dtype):
        return {"window": self.cache(batch, device, dtype, "window", self.spec.window),
                "global": self.cache(batch, device, dtype, "global",
                                     limit=self.spec.n_global)}

    def forward(self, x, state=None):
        w, g = self.spec.window, self.spec.n_global
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
            fresh = True
        else:
            fresh = False
        win, glob = state["window"], state["global"]
        pos0 = win.pos
        q, k, v, gate = self.project(x, pos0)
        glob = glob.rebuilt(k, v) if fresh else glob.write(k, v)     # positions 0 .. g - 1
        if fresh:                             # whole sequence: the caches view k and v
            kg, vg = glob.ordered(glob.held())
            y = self.attend(q, k, v, window=w, k_global=kg, v_global=vg)
            win = win.rebuilt(k, v)
        elif q.shape[2] == 1:
            # decode: the window's ring, and the global keys it no longer holds (p <= pos - w)
            win = win.write(k, v)
            K, V = win.all_slots()
            outside = max(0, min(g, pos0 - w + 1))
            if outside:
                K = torch.cat([glob.k[:, :, :outside], K], 2)
                V = torch.cat([glob.v[:, :, :outside], V], 2)
            y = self.attend(q, K, V, q_pos0=K.shape[2] - 1, k_pos0=0)
        else:
            kg, vg = glob.ordered(glob.held())
            n = min(pos0, w - 1)
            pk, pv = win.ordered(n)
            K = torch.cat([pk.to(k.dtype), k], 2) if n else k
            V = torch.cat([pv.to(v.dtype), v], 2) if n else v
            y = self.attend(q, K, V, q_pos0=pos0, k_pos0=pos0 - n, window=w, k_global=kg,
                            v_global=vg)
            win = win.write(k, v)
        return self.output(y, gate), {"window": win, "global": glob}

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        w, g = spec.window, spec.n_global
        # window keys: min(t + 1, w) at 0-based position t; global keys beyond the window:
        # clamp(t - w + 1, 0, g), summed in closed form over t < T
        span = max(0, T - w)
        ramp = min(g, span)
        outside = ramp * (ramp + 1) / 2 + g * max(0, span - g)
        keys = mean_visible(T, w) + outside / T
        return cls.projection_flops(spec, d_model) + cls.mixing_flops(spec, d_model, keys)

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        kept = min(T, spec.window) + min(T, spec.n_global)        # the ring + the first g
        return cls.cache_bytes(spec, d_model, kept, dtype_bytes)

