"""``gated_linear_recurrence``: the unified view of DESIGN.md, one op for linear attention,
RetNet, GLA, Mamba-2, Mamba-1 and RG-LRU. Per batch b and head h, with state S (K x V):

    S_t = G_t * S_{t-1} + k_t v_t^T          G_t = exp(log_g_t), broadcast over V
    o_t = S_t^T q_t                           (includes the current token)

``log_g`` (all entries <= 0) takes one of three shapes:

* ``None``: G = 1, linear attention (Katharopoulos et al. 2020). For its normaliser
  z_t = sum_{s<=t} k_s, append a column of ones to v: the last output column is q_t . z_t.
* (B, T, H): a scalar per head: RetNet (fixed gamma), Mamba-2 / SSD (Dao & Gu 2024, with
  q = C, k = B, v = dt * x, log g = dt * A).
* (B, T, H, K): a vector over the key dimension: GLA (Yang et al. 2023), RWKV-6 style decays.
* (B, T, H) with ``A`` (H, K): the vector gate log_g[..., None] * A, never materialised by
  the backends that need not. Mamba-1 (Gu & Dao 2023) is this case with one head per
  channel: H = d_inner, q = C and k = B shared by all heads (Hk = 1), K = d_state, V = 1,
  v = dt * x, log_g = dt and A its (negative) state matrix diagonal. RG-LRU (De et al. 2024)
  is the scalar case with K = V = 1 and q = k = 1.

Shapes: q, k (B, T, Hk, K); v (B, T, H, V); state (B, H, K, V). Hk divides H: head h reads
q and k of head h // (H / Hk), as Mamba-2's groups share B and C (Hk = H: one each).
Returns o (B, T, H, V) and the final state (B, H, K, V) in the dtype of ``q``; the backends
accumulate in float32 (float64 for float64 inputs).

Backends (same signature): ``reference`` (sequential, :mod:`.reference`), ``chunked``
(matmuls inside chunks; any shape, :mod:`.chunked` and :mod:`.narrow`) and, for V = 1, where
there is no matmul to give (Mamba-1, RG-LRU), ``scan`` and ``scan_recompute``
(:mod:`.scan`) and the compiled ``native`` (:mod:`.native`, CPU): ``auto`` picks those for
such calls through the registry's shape declaration; ``step`` (:mod:`.step`) runs T = 1, a
decode step, in a few plain ops, and ``auto`` picks it for every such call.
"""
from composer.core.registry import register_op

OP = "gated_linear_recurrence"
register_op(OP, "S_t = exp(log_g_t) * S_{t-1} + k_t v_t^T, o_t = S_t^T q_t; log_g None, per head, "
                "per key dim, or per head times A per key dim (linear attention, RetNet, GLA, "
                "Mamba-2/SSD, Mamba-1, RG-LRU)")

# the backends register on import, after the op and in this order
from blocks.ops.recurrence.reference import recurrence_reference  # noqa: E402
from blocks.ops.recurrence.chunked import recurrence_chunked  # noqa: E402
from blocks.ops.recurrence.native import recurrence_native  # noqa: E402
from blocks.ops.recurrence.scan import recurrence_scan, recurrence_scan_recompute  # noqa: E402
from blocks.ops.recurrence.step import recurrence_step  # noqa: E402

__all__ = ["OP", "recurrence_reference", "recurrence_chunked", "recurrence_native",
           "recurrence_scan", "recurrence_scan_recompute", "recurrence_step"]
