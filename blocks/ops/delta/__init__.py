"""Op ``delta_rule``: the generalised delta rule, a diagonal-plus-rank-1 state transition.

Per batch b and head h, with state S (K x V, keys by values) and w_t = exp(log_w_t):

    S_t = (diag(w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T
    o_t = S_t^T q_t                                   (includes the current token)

``a`` is where the old state is read (a_t^T S_{t-1}, a value vector, taken before the decay),
``b`` where that read is written back. ``a`` defaults to ``k``; a ``b`` with one number per
head and token stands for that number times ``k_t`` (the plain delta rule, which the chunked
backend runs with half the matmuls). The decay is one scalar per head or one value per key
channel. The family:

* DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
  Sequence Length"): S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, i.e.
  v -> beta v, b = -beta (times k), no decay.
* Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks"):
  S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, i.e. v -> beta v,
  b = -alpha beta (times k), log_w = log alpha (one scalar per head).
* RWKV-7 "Goose" (Peng et al. 2025), which writes the state transposed (V x K):
  S_t = S_{t-1}(diag(w_t) + a_t b_t^T) + v_t k_t^T; the same recurrence with a = -kappa_hat,
  b = kappa_hat * a_icl (vectors) and log_w one value per key channel.

Shapes: q, k (B, T, H, K); v (B, T, H, V); b (B, T, H) or (B, T, H, K); a None or
(B, T, H, K); log_w None (w = 1), (B, T, H) or (B, T, H, K), every entry <= 0; state
(B, H, K, V). Returns o (B, T, H, V) and the final state (B, H, K, V) in the dtype of ``q``;
the backends compute in float32 (float64 for float64 inputs). ``reference`` and ``chunked``
take every form above, and the chunked one is exact for all of them, decays near 0 and near 1
included (log w down to -inf: float64 prefix sums where a chunk decays far, see
``chunked._prefix_sums``). ``step`` (:mod:`.step`) takes every form at T = 1 (a decode step in
a few plain ops), and ``auto`` picks it for every such call.
"""
from composer.core.registry import register_op

OP = "delta_rule"
register_op(OP, "S_t = (diag(w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t "
                "(DeltaNet, Gated DeltaNet, RWKV-7)")

# the backends register on import, after the op and in this order
from blocks.ops.delta.reference import delta_reference  # noqa: E402
from blocks.ops.delta.chunked import delta_chunked  # noqa: E402
from blocks.ops.delta.step import delta_step  # noqa: E402

__all__ = ["OP", "delta_reference", "delta_chunked", "delta_step"]
