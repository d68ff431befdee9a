"""Cases for the softmax-attention family beyond tests/cases/core.py (d_model 32)."""
CASES = {
    "attention_gated_qknorm": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2,
                               "head_dim": 12, "qk_norm": "rms_offset", "output_gate": True,
                               "rope_fraction": 0.5, "scale": 0.2, "window": 7},
    "attention_qknorm_rms_bias": {"kind": "attention", "n_heads": 2, "qk_norm": "rms",
                                  "bias": True},
    "block_attention": {"n_heads": 4, "n_kv_heads": 2, "block_size": 5},
    "block_attention_gated": {"kind": "block_attention", "n_heads": 2, "n_kv_heads": 1,
                              "block_size": 8, "qk_norm": "rms_offset", "output_gate": True},
    "sparse_attention": {"n_heads": 4, "n_kv_heads": 2, "window": 4, "n_global": 3},
    "sparse_attention_one_sink": {"kind": "sparse_attention", "n_heads": 2, "window": 6,
                                  "n_global": 1, "rope_fraction": 0.25, "output_gate": True},
}
