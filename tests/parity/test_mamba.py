"""Parity with Hugging Face: weights of a random MambaMixer / Mamba2Mixer copied into our
``mamba`` / ``mamba2`` blocks give the same outputs (float32, 1e-4 relative); likewise
RecurrentGemma's recurrent block and our ``rglru`` (the same diagonal scan, N = 1).

Both HF mixers run their pure-PyTorch paths: mamba_ssm and causal_conv1d are blocked, and the
mixers are in eval mode without a cache (the sequential scan for Mamba, ``torch_forward``'s
chunked SSD for Mamba-2).
"""
import sys

import pytest
import torch

from composer.core.kernels import use_kernels
from composer.core.registry import block_types

from helpers import rel_err

for _name in ("mamba_ssm", "causal_conv1d", "fla"):   # keep HF on its torch paths
    sys.modules.setdefault(_name, None)

transformers = pytest.importorskip("transformers")

D = 32


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Fresh random values in every parameter (HF leaves some at 0 or 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def hf_mamba(**kw):
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer
    cfg = MambaConfig(hidden_size=D, num_hidden_layers=1, use_associative_scan=False, **kw)
    mixer = MambaMixer(cfg, layer_idx=0).eval()
    _randomise(mixer, 1)
    with torch.no_grad():   # realistic positive steps and decays
        mixer.A_log.copy_(torch.rand(mixer.A_log.shape).mul(3).add(-1))
        mixer.dt_proj.bias.copy_(torch.rand(mixer.dt_proj.bias.shape) - 3)
    return mixer, cfg


def ours_from_hf_mamba(mixer, cfg, chunk_size):
    bt = block_types()["mamba"]
    spec = bt.spec(d_state=cfg.state_size, d_conv=cfg.conv_kernel, expand=cfg.expand,
                   dt_rank=int(cfg.time_step_rank), conv_bias=cfg.use_conv_bias,
                   bias=cfg.use_bias, chunk_size=chunk_size)
    blk = bt.module(spec, D)
    sd = {k: v for k, v in mixer.state_dict().items() if k != "dt_proj.bias"}
    sd["dt_bias"] = mixer.dt_proj.bias.detach().clone()
    blk.load_state_dict(sd)
    return blk


def hf_mamba2(**kw):
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    cfg = Mamba2Config(hidden_size=D, num_hidden_layers=1, **kw)
    mixer = Mamba2Mixer(cfg, layer_idx=0).eval()
    _randomise(mixer, 2)
    with torch.no_grad():
        mixer.A_log.copy_(torch.rand(mixer.A_log.shape).mul(3).add(-1))
        mixer.dt_bias.copy_(torch.rand(mixer.dt_bias.shape) - 3)
    return mixer, cfg


def ours_from_hf_mamba2(mixer, cfg, chunk_size):
    bt = block_types()["mamba2"]
    limit = tuple(cfg.time_step_limit)
    spec = bt.spec(d_state=cfg.state_size, d_conv=cfg.conv_kernel, expand=cfg.expand,
                   head_dim=cfg.head_dim, n_groups=cfg.n_groups, chunk_size=chunk_size,
                   conv_bias=cfg.use_conv_bias, bias=cfg.use_bias, norm_eps=cfg.layer_norm_epsilon,
                   dt_limit=None if limit == (0.0, float("inf")) else limit)
    blk = bt.module(spec, D)
    sd = dict(mixer.state_dict())
    sd["norm_weight"] = sd.pop("norm.weight")
    blk.load_state_dict(sd)
    return blk


def _compare(hf, ours, T, seed, backends=("reference", "chunked")):
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(x)
        for backend in backends:
            with use_kernels({"gated_linear_recurrence": backend}):
                y, _ = ours(x)
            assert rel_err(y, ref) < 1e-4, backend


@pytest.mark.parametrize("T,chunk", [(1, 8), (37, 8), (64, 16)])
@pytest.mark.parametrize("kw", [{}, {"state_size": 8, "conv_kernel": 3, "time_step_rank": 5,
                                     "use_bias": True, "expand": 3}])
def test_mamba_matches_hf_mamba_mixer(T, chunk, kw):
    mixer, cfg = hf_mamba(**kw)
    _compare(mixer, ours_from_hf_mamba(mixer, cfg, chunk), T, T, ("reference", "chunked", "scan"))


@pytest.mark.parametrize("T,chunk", [(1, 8), (37, 8), (100, 32)])
@pytest.mark.parametrize("kw", [
    {"num_heads": 4, "head_dim": 16, "state_size": 8, "n_groups": 1},
    {"num_heads": 8, "head_dim": 8, "state_size": 4, "n_groups": 2, "use_bias": True,
     "conv_kernel": 3, "time_step_limit": (0.05, 0.5), "layer_norm_epsilon": 1e-3},
])
def test_mamba2_matches_hf_mamba2_mixer(T, chunk, kw):
    mixer, cfg = hf_mamba2(expand=2, chunk_size=chunk, **kw)
    _compare(mixer, ours_from_hf_mamba2(mixer, cfg, chunk), T, T + 1)


@pytest.mark.parametrize("T,chunk", [(1, 8), (37, 8), (100, 32)])
@pytest.mark.parametrize("heads,width", [(2, None), (4, 48)])
def test_rglru_matches_hf_recurrent_gemma_block(T, chunk, heads, width):
    from transformers import RecurrentGemmaConfig
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import (
        RecurrentGemmaRecurrentBlock)
    cfg = RecurrentGemmaConfig(hidden_size=D, num_attention_heads=heads, lru_width=width,
                               num_hidden_layers=1, vocab_size=64)
    hf = RecurrentGemmaRecurrentBlock(cfg, 0).eval()
    _randomise(hf, 3)
    bt = block_types()["rglru"]
    ours = bt.module(bt.spec(lru_width=cfg.lru_width, n_heads=heads, d_conv=cfg.conv1d_width,
                             chunk_size=chunk), D)
    sd = {k.replace("rg_lru.", ""): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(sd)
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ref, _ = hf(x, position_ids=torch.arange(T)[None].expand(2, T), attention_mask=None,
                    use_cache=False)
        for backend in ("reference", "chunked", "scan"):
            with use_kernels({"gated_linear_recurrence": backend}):
                y, _ = ours(x)
            assert rel_err(y, ref) < 1e-4, backend
