"""Cases for the gated linear-recurrence family: linear attention, RetNet, GLA, Mamba-1,
RG-LRU."""
CASES = {
    "linear_attention": {"n_heads": 4, "chunk_size": 8},
    "linear_attention_relu_unnormalised": {"kind": "linear_attention", "n_heads": 2,
                                           "feature_map": "relu", "normalize": False,
                                           "output_norm": True, "chunk_size": 5},
    "linear_attention_softmax_map": {"kind": "linear_attention", "n_heads": 2,
                                     "feature_map": "softmax", "chunk_size": 16},
    "retnet": {"n_heads": 4, "chunk_size": 8},
    "retnet_no_rope": {"kind": "retnet", "n_heads": 2, "expand_v": 1.0, "rope": False,
                       "chunk_size": 5},
    "gla": {"n_heads": 2, "gate_low_rank": 4, "chunk_size": 8},
    "gla_long_chunks": {"kind": "gla", "n_heads": 4, "expand_k": 1.0, "chunk_size": 32},
    "mamba": {"d_state": 4, "chunk_size": 8},
    "mamba_rank": {"kind": "mamba", "d_state": 8, "dt_rank": 3, "d_conv": 2, "chunk_size": 5},
    "rglru": {"n_heads": 4, "chunk_size": 8},
    "rglru_wide": {"kind": "rglru", "lru_width": 48, "n_heads": 3, "d_conv": 3, "chunk_size": 5},
}
