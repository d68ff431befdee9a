"""Op ``attention``: causal softmax attention — global, sliding window, block-local, sparse.

One visibility rule covers the whole family. Query i sits at absolute position
``pq = q_pos0 + i``, key j at ``pk = k_pos0 + j``; the query sees the key when

    0 <= pq - pk                                       causal
    pq - pk < window                 (window set)      sliding window (Beltagy et al. 2020)
    pq // block_size == pk // block_size  (block_size set)   block-local attention

Optional global keys ``k_global, v_global`` hold positions 0 .. G-1 (Longformer's global tokens
restricted to a causal model, i.e. StreamingLLM's attention sinks, Xiao et al. 2023). They need
a window and are seen by query pq when ``pk <= pq - window``: those inside the window are
already among ``k``, so no key counts twice.

Shapes: q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D); k_global, v_global (B, Hkv, G, D); Hq a
multiple of Hkv (GQA; Hkv = 1 is MQA). Returns (B, Hq, Tq, D). A query that sees no key
returns 0. ``scale`` defaults to D ** -0.5.

Backends (same signature; masks and the dense form in :mod:`._common`):

* ``reference``: the explicit masked softmax, O(Tq·Tk); the definition of truth.
* ``chunked``: the structured form, O(Tq·w) for a window and O(Tq·block_size) for blocks: the
  queries are cut into chunks and each chunk runs one ``scaled_dot_product_attention`` over
  the few key chunks its band can reach (a (chunk, span) mask, the same for every chunk up to
  the edges). Global attention has no band to exploit: it runs as one causal sdpa call.
* ``sdpa`` (what ``auto`` picks): one dense sdpa call where that is cheaper (global attention,
  or keys at most 4/3 of a band's span, the measured crossover), else the ``chunked`` form.
  Both forms give any call the same result, so this is a choice of speed inside one backend
  rather than a shape declaration in the registry (which says what a backend can run).
"""
from composer.core.registry import register_op

OP = "attention"
register_op(OP, "causal softmax attention: global, sliding window, block-local, global tokens "
                "+ window (GQA)")

# the backends register on import, after the op and in this order
from blocks.ops.attention.reference import attention_reference  # noqa: E402
from blocks.ops.attention.chunked import attention_chunked  # noqa: E402
from blocks.ops.attention.sdpa import attention_sdpa  # noqa: E402

__all__ = ["OP", "attention_reference", "attention_chunked", "attention_sdpa"]
