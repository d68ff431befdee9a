"""Parity with Hugging Face's Jamba sparse MoE block (transformers is a test-only dependency).

Jamba routes with a softmax over all experts, keeps the top-k probabilities unnormalised, and
runs SwiGLU experts (gate_up_proj stacked as [gate; up]); its load-balancing loss is the
Switch / Mixtral form our block adds through ``add_aux_loss``.
"""
import pytest
import torch

from blocks.moe import MoE, MoESpec
from composer.core.aux import collect_aux_losses

from helpers import rel_err

jamba = pytest.importorskip("transformers.models.jamba.modeling_jamba")
JambaConfig = pytest.importorskip("transformers").JambaConfig

D, H, E, K = 32, 48, 6, 2


def pair():
    """A random HF Jamba MoE block and ours with the same weights."""
    cfg = JambaConfig(hidden_size=D, intermediate_size=H, num_experts=E, num_experts_per_tok=K,
                      hidden_act="silu")
    hf = jamba.JambaSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in hf.parameters():         # HF leaves these empty until the model's init
            p.copy_(torch.randn_like(p) * 0.2)
    ours = MoE(MoESpec(n_experts=E, top_k=K, router="softmax_topk", normalize_topk=False,
                       expert={"d_ff": H, "activation": "swiglu"}, aux_loss_coef=1.0),
               D)
    with torch.no_grad():
        ours.router.weight.copy_(hf.router.weight)
        for e, mlp in enumerate(ours.experts):
            gate, up = hf.experts.gate_up_proj[e].chunk(2, dim=0)        # (H, D) each
            mlp.gate.weight.copy_(gate)
            mlp.up.weight.copy_(up)
            mlp.down.weight.copy_(hf.experts.down_proj[e])                # (D, H)
    return hf, ours


@pytest.mark.parametrize("B,T", [(1, 1), (2, 37), (3, 200)])
def test_outputs_match_hf_jamba_moe(B, T):
    hf, ours = pair()
    x = torch.randn(B, T, D)
    with torch.no_grad():
        y_hf = hf(x)
        y, _ = ours(x)
    assert rel_err(y, y_hf) < 1e-4


def test_router_logits_and_aux_loss_match_hf():
    hf, ours = pair()
    x = torch.randn(2, 64, D)
    with torch.no_grad():
        logits_hf, w_hf, idx_hf = hf.router(x.view(-1, D))
        w, idx, _ = ours.route(ours.router(x.view(-1, D)))
        with collect_aux_losses() as aux:
            ours(x)
    assert rel_err(ours.router(x.view(-1, D)), logits_hf) < 1e-6
    assert torch.equal(idx, idx_hf) and rel_err(w, w_hf) < 1e-6
    lb = jamba.load_balancing_loss_func((logits_hf,), num_experts=E, top_k=K)
    assert abs(aux[0].item() - lb.item()) < 1e-5 * lb.item()


def test_gradients_match_hf():
    """float32 (HF's router softmax runs in float32 whatever the input dtype)."""
    hf, ours = pair()
    x = torch.randn(2, 30, D)
    w = torch.randn(2, 30, D)
    (hf(x) * w).sum().backward()
    (ours(x)[0] * w).sum().backward()
    assert rel_err(ours.router.weight.grad, hf.router.weight.grad) < 1e-4
    down = torch.stack([m.down.weight.grad for m in ours.experts])
    gate_up = torch.stack([torch.cat([m.gate.weight.grad, m.up.weight.grad]) for m in
                           ours.experts])
    assert rel_err(down, hf.experts.down_proj.grad) < 1e-4
    assert rel_err(gate_up, hf.experts.gate_up_proj.grad) < 1e-4
