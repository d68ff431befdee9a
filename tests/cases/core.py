"""Cases for the blocks of the first issue (attention, Mamba-2, MLP) and Zoology's BaseConv."""
CASES = {
    "attention": {"n_heads": 4, "n_kv_heads": 2},
    "attention_window": {"kind": "attention", "n_heads": 2, "window": 5},
    "attention_mqa_partial_rope": {"kind": "attention", "n_heads": 4, "n_kv_heads": 1,
                                   "rope_fraction": 0.5},
    "mamba2": {"d_state": 8, "head_dim": 16, "chunk_size": 8},
    "mamba2_groups": {"kind": "mamba2", "d_state": 4, "head_dim": 8, "n_groups": 2,
                      "chunk_size": 5},
    "mlp": {},
    "mlp_gelu": {"kind": "mlp", "activation": "gelu"},
    "base_conv": {},
    "base_conv_k4": {"kind": "base_conv", "kernel_size": 4},
}
