"""Cases for the MoE and adaptive-compute (routed) blocks."""
_ATTN = {"kind": "attention", "n_heads": 2, "n_kv_heads": 1}
_MAMBA = {"kind": "mamba2", "d_state": 4, "head_dim": 16, "chunk_size": 4}

CASES = {
    "moe": {"n_experts": 4, "top_k": 2, "expert": {"d_ff": 16}},
    "moe_top1_shared": {"kind": "moe", "n_experts": 3, "top_k": 1,
                        "expert": {"d_ff": 24, "activation": "geglu"},
                        "shared_expert": {"d_ff": 16}, "shared_expert_gate": True},
    "moe_topk_softmax": {"kind": "moe", "n_experts": 5, "top_k": 3, "router": "topk_softmax",
                         "expert": {"d_ff": 8}},
    "routed": {"mode": "skip", "paths": [_ATTN]},
    "routed_skip_mamba2": {"kind": "routed", "mode": "skip", "paths": [_MAMBA],
                           "threshold": 0.4},
    "routed_skip_mlp": {"kind": "routed", "paths": [{"kind": "mlp", "d_ff": 16}]},
    "routed_choice_mixers": {"kind": "routed", "mode": "choice",
                             "paths": [{**_ATTN, "window": 4}, _MAMBA]},
    "routed_choice_mixed": {"kind": "routed", "mode": "choice",
                            "paths": [_MAMBA, {"kind": "mlp", "d_ff": 16},
                                      {"kind": "moe", "n_experts": 2, "top_k": 1,
                                       "expert": {"d_ff": 8}}]},
}
