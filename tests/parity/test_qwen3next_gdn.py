"""Parity with Hugging Face's Qwen3-Next Gated DeltaNet: its weights loaded into our
``gated_deltanet`` block give its outputs (float32, 1e-4 relative), and our delta-rule
backends match its torch fallbacks (chunked and recurrent)."""
import sys

import pytest
import torch

from composer.core.kernels import use_kernels
from composer.core.registry import block_types

from helpers import rel_err

# transformers would try flash-linear-attention's GPU kernels if it were importable
sys.modules.setdefault("fla", None)
hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
Qwen3NextConfig = pytest.importorskip("transformers").Qwen3NextConfig

D = 32


def pair(n_k, n_v, dk, dv, d_conv=4, chunk_size=32):
    """HF's layer (random init, random A_log and dt_bias) and ours with its weights."""
    cfg = Qwen3NextConfig(hidden_size=D, num_hidden_layers=1, layer_types=["linear_attention"],
                          linear_num_key_heads=n_k, linear_num_value_heads=n_v,
                          linear_key_head_dim=dk, linear_value_head_dim=dv,
                          linear_conv_kernel_dim=d_conv)
    torch.manual_seed(0)
    theirs = hf.Qwen3NextGatedDeltaNet(cfg, layer_idx=0).eval()
    with torch.no_grad():
        theirs.dt_bias.normal_()
        theirs.norm.weight.uniform_(0.5, 1.5)
    bt = block_types()["gated_deltanet"]
    spec = bt.spec(n_k_heads=n_k, n_v_heads=n_v, head_k_dim=dk, head_v_dim=dv, d_conv=d_conv,
                   chunk_size=chunk_size, norm_eps=cfg.rms_norm_eps)
    ours = bt.module(spec, D)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("n_k,n_v,dk,dv", [(2, 4, 8, 6), (2, 2, 16, 16), (1, 3, 8, 8)])
@pytest.mark.parametrize("T", [1, 37, 150])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_block_matches_hf_layer(n_k, n_v, dk, dv, T, backend):
    theirs, ours = pair(n_k, n_v, dk, dv)
    x = torch.randn(2, T, D)
    with torch.no_grad(), use_kernels({"delta_rule": backend}):
        y_ref = theirs(x)
        y, _ = ours(x)
    assert rel_err(y, y_ref) < 1e-4


def test_carried_state_matches_hf_on_one_sequence():
    """Our state carried across three calls equals HF on the whole sequence."""
    theirs, ours = pair(2, 4, 8, 8, chunk_size=16)
    x = torch.randn(2, 70, D)
    with torch.no_grad():
        y_ref = theirs(x)
        st = ours.init_state(2, x.device, x.dtype)
        parts = []
        for sl in (slice(0, 30), slice(30, 31), slice(31, None)):
            y, st = ours(x[:, sl], st)
            parts.append(y)
    assert rel_err(torch.cat(parts, 1), y_ref) < 1e-4


def gdn_inputs(T, H=3, K=8, V=5):
    g = torch.Generator().manual_seed(T)
    q, k = torch.randn(2, T, H, K, generator=g), torch.randn(2, T, H, K, generator=g)
    v = torch.randn(2, T, H, V, generator=g)
    beta = torch.rand(2, T, H, generator=g)
    log_a = -torch.rand(2, T, H, generator=g) * 2
    s0 = torch.randn(2, H, K, V, generator=g)
    return q, k, v, beta, log_a, s0


def as_ours(q, k, v, beta, log_a):
    """HF's kernel arguments as ours: l2-normalised, scaled q; v -> beta v; b = -alpha beta."""
    q, k = hf.l2norm(q), hf.l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v * beta[..., None], -beta * log_a.exp(), log_a


@pytest.mark.parametrize("T", [1, 50, 130])
@pytest.mark.parametrize("ours_fn,theirs_name", [
    ("chunked", "torch_chunk_gated_delta_rule"), ("reference", "torch_recurrent_gated_delta_rule")])
def test_ops_match_hf_fallbacks(T, ours_fn, theirs_name):
    from blocks.ops import delta
    q, k, v, beta, log_a, s0 = gdn_inputs(T)
    o_ref, S_ref = getattr(hf, theirs_name)(q, k, v, log_a, beta, initial_state=s0,
                                           output_final_state=True,
                                           use_qk_l2norm_in_kernel=True)
    o, S = getattr(delta, f"delta_{ours_fn}")(*as_ours(q, k, v, beta, log_a), s0)
    assert rel_err(o, o_ref) < 1e-4 and rel_err(S, S_ref) < 1e-4
