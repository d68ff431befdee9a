"""Parity with Hugging Face's Gemma 3 attention layer (sliding and global), weights copied in.

Gemma 3 attention: GQA, RMSNorm on q and k scaled by (1 + weight), RoPE over the whole head
(local base 10k on sliding layers, 1M on global ones), scale query_pre_attn_scalar ** -0.5, a
sliding window of ``sliding_window`` tokens on the local layers. HF builds the masks and the
rotary embeddings outside the layer; we use their own helpers so the semantics are theirs.
"""
import pytest
import torch

from blocks.attention import Attention, AttentionSpec
from composer.core.kernels import use_kernels

from helpers import rel_err

gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
masking = pytest.importorskip("transformers.masking_utils")

D, HEADS, KV, HD, WINDOW, SCALAR = 48, 4, 2, 16, 6, 20


def hf_config():
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    cfg = Gemma3TextConfig(
        vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HD,
        query_pre_attn_scalar=SCALAR, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024)
    cfg._attn_implementation = "eager"
    return cfg


def hf_layer_and_inputs(layer_idx: int, T: int):
    cfg = hf_config()
    hf = gemma3.Gemma3Attention(cfg, layer_idx).eval()
    with torch.no_grad():  # the norm weights start at 0: give the (1 + w) offset real work
        hf.q_norm.weight.normal_(0, 0.5)
        hf.k_norm.weight.normal_(0, 0.5)
    x = torch.randn(2, T, D)
    pos = torch.arange(T)[None].expand(2, T)
    kind = cfg.layer_types[layer_idx]
    cos, sin = gemma3.Gemma3RotaryEmbedding(cfg)(x, pos, kind)
    make_mask = (masking.create_sliding_window_causal_mask if kind == "sliding_attention"
                 else masking.create_causal_mask)
    mask = make_mask(config=cfg, inputs_embeds=x, attention_mask=None, cache=None,
                     position_ids=pos)
    with torch.no_grad():
        y_hf, _ = hf(x, position_embeddings=(cos, sin), attention_mask=mask)
    theta = cfg.rope_parameters[kind]["rope_theta"]
    return hf, x, y_hf, kind, theta


def ours_from(hf, kind: str, theta: float) -> Attention:
    spec = AttentionSpec(n_heads=HEADS, n_kv_heads=KV, head_dim=HD, qk_norm="rms_offset",
                         norm_eps=hf.q_norm.eps, scale=SCALAR ** -0.5, rope_theta=theta,
                         window=WINDOW if kind == "sliding_attention" else None)
    ours = Attention(spec, D).eval()
    ours.load_state_dict(hf.state_dict())  # same names: q/k/v/o_proj, q_norm, k_norm
    return ours


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["sliding", "global"])
@pytest.mark.parametrize("backend", ["reference", "chunked", "auto"])
@pytest.mark.parametrize("T", [1, 37, 300])
def test_gemma3_attention_matches_hf(layer_idx, backend, T):
    hf, x, y_hf, kind, theta = hf_layer_and_inputs(layer_idx, T)
    ours = ours_from(hf, kind, theta)
    with torch.no_grad(), use_kernels({"attention": backend}):
        y, _ = ours(x)
    assert rel_err(y, y_hf) < 1e-4


def test_gemma3_sliding_layer_matches_hf_in_two_calls():
    """The KV cache of the window, carried across calls, still gives HF's whole-sequence rows."""
    hf, x, y_hf, kind, theta = hf_layer_and_inputs(0, 29)
    ours = ours_from(hf, kind, theta)
    with torch.no_grad():
        ya, st = ours(x[:, :11], ours.init_state(2, x.device, x.dtype))
        yb, _ = ours(x[:, 11:], st)
    assert rel_err(torch.cat([ya, yb], 1), y_hf) < 1e-4
