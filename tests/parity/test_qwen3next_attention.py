"""Parity with Hugging Face's Qwen3-Next gated attention layer, weights copied in.

Qwen3-Next attention: q_proj yields [query | gate] per head, RMSNorm on q and k scaled by
(1 + weight), partial RoPE (the first quarter of each head's dims), GQA, and the output
multiplied by sigmoid(gate) before o_proj. Masks and rotary embeddings come from HF's helpers.
"""
import sys

import pytest
import torch

from blocks.attention import Attention, AttentionSpec
from composer.core.kernels import use_kernels

from helpers import rel_err

# flash-linear-attention, where installed, would pull in GPU kernels: keep the torch paths
sys.modules["fla"] = None
qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
masking = pytest.importorskip("transformers.masking_utils")

D, HEADS, KV, HD, ROPE_FRACTION = 40, 4, 2, 24, 0.25


def hf_layer_and_inputs(T: int):
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
    cfg = Qwen3NextConfig(
        vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HD,
        partial_rotary_factor=ROPE_FRACTION, layer_types=["full_attention"],
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=1024)
    cfg._attn_implementation = "eager"
    hf = qwen3_next.Qwen3NextAttention(cfg, 0).eval()
    with torch.no_grad():  # the norm weights start at 0: give the (1 + w) offset real work
        hf.q_norm.weight.normal_(0, 0.5)
        hf.k_norm.weight.normal_(0, 0.5)
    x = torch.randn(2, T, D)
    pos = torch.arange(T)[None].expand(2, T)
    cos, sin = qwen3_next.Qwen3NextRotaryEmbedding(cfg)(x, pos)
    mask = masking.create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=None,
                                      cache=None, position_ids=pos)
    with torch.no_grad():
        y_hf, _ = hf(x, position_embeddings=(cos, sin), attention_mask=mask)
    spec = AttentionSpec(n_heads=HEADS, n_kv_heads=KV, head_dim=HD, qk_norm="rms_offset",
                         norm_eps=cfg.rms_norm_eps, output_gate=True,
                         rope_fraction=ROPE_FRACTION,
                         rope_theta=cfg.rope_parameters["rope_theta"])
    ours = Attention(spec, D).eval()
    ours.load_state_dict(hf.state_dict())  # same names; q_proj rows are [query | gate] per head
    return ours, x, y_hf


@pytest.mark.parametrize("backend", ["reference", "chunked", "auto"])
@pytest.mark.parametrize("T", [1, 45])
def test_qwen3next_attention_matches_hf(backend, T):
    ours, x, y_hf = hf_layer_and_inputs(T)
    with torch.no_grad(), use_kernels({"attention": backend}):
        y, _ = ours(x)
    assert rel_err(y, y_hf) < 1e-4


def test_qwen3next_attention_matches_hf_token_by_token():
    ours, x, y_hf = hf_layer_and_inputs(12)
    st = ours.init_state(2, x.device, x.dtype)
    rows = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y_t, st = ours.step(x[:, t], st)
            rows.append(y_t)
    assert rel_err(torch.stack(rows, 1), y_hf) < 1e-4
