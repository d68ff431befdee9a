"""Cases for the delta-rule family: DeltaNet, Gated DeltaNet, RWKV-7 (d_model 32)."""
CASES = {
    "deltanet": {"n_heads": 2, "chunk_size": 8},
    "deltanet_noconv_negeig": {"kind": "deltanet", "n_heads": 4, "d_conv": 0,
                               "neg_eigval": True, "chunk_size": 5},
    "gated_deltanet": {"n_k_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 6,
                       "chunk_size": 8},
    "gated_deltanet_mha_conv2": {"kind": "gated_deltanet", "n_k_heads": 2, "n_v_heads": 2,
                                 "head_k_dim": 16, "head_v_dim": 16, "d_conv": 2,
                                 "chunk_size": 5},
    "rwkv7": {"head_dim": 8, "decay_rank": 8, "a_rank": 8, "gate_rank": 16, "chunk_size": 8},
    "rwkv7_wide_heads": {"kind": "rwkv7", "head_dim": 16, "decay_rank": 4, "a_rank": 4,
                         "gate_rank": 4, "chunk_size": 20},
}
