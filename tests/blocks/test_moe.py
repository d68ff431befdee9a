"""MoE: sparse dispatch == a dense all-experts computation; the Switch loss reaches the trainer."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import composer
from blocks.common import balance_loss
from blocks.moe import MoE, MoESpec
from composer.core.aux import collect_aux_losses

from helpers import recipe_from, rel_err

D = 32
ACT = {"swiglu": F.silu, "geglu": F.gelu}


def make(dtype=torch.float64, **settings) -> MoE:
    settings.setdefault("expert", {"d_ff": 16})
    return MoE(MoESpec(**settings), D).to(dtype)


def dense_ffn(mlp, x):
    """act(x W_gate^T) * (x W_up^T) W_down^T, from the weights."""
    act = ACT[mlp.spec.activation]
    return (act(x @ mlp.gate.weight.T) * (x @ mlp.up.weight.T)) @ mlp.down.weight.T


def dense_moe(blk: MoE, x: torch.Tensor):
    """Every expert on every token, combined with the router's top-k weights.

    Returns y (B, T, D), chosen experts (N, k) and router probabilities (N, E)."""
    s = blk.spec
    xf = x.reshape(-1, D)
    logits = xf @ blk.router.weight.T                                  # (N, E)
    e = (logits - logits.max(-1, keepdim=True).values).exp()
    probs = e / e.sum(-1, keepdim=True)
    chosen = probs.argsort(-1, descending=True)[:, : s.top_k]          # (N, k)
    if s.router == "softmax_topk":
        w = probs.gather(1, chosen)
    else:
        lk = logits.gather(1, chosen)
        w = (lk - lk.max(-1, keepdim=True).values).exp()
        w = w / w.sum(-1, keepdim=True)
    if s.normalize_topk:
        w = w / w.sum(-1, keepdim=True)
    every = torch.stack([dense_ffn(m, xf) for m in blk.experts], 1)    # (N, E, D)
    y = (every.gather(1, chosen[..., None].expand(-1, -1, D)) * w[..., None]).sum(1)
    if blk.shared is not None:
        sh = dense_ffn(blk.shared, xf)
        if blk.shared_gate is not None:
            sh = sh * torch.sigmoid(xf @ blk.shared_gate.weight.T)
        y = y + sh
    return y.view_as(x), chosen, probs


def switch_loss(chosen, probs, E):
    """E * sum_i f_i P_i with f_i counted by a loop over tokens and slots."""
    f = torch.zeros(E, dtype=probs.dtype)
    for row in chosen.tolist():
        for i in row:
            f[i] += 1
    f = f / chosen.shape[0]
    return E * sum(f[i] * probs[:, i].mean() for i in range(E))


SETTINGS = {
    "top1": dict(n_experts=4, top_k=1),
    "top2": dict(n_experts=4, top_k=2),
    "top2_normalized": dict(n_experts=6, top_k=2, normalize_topk=True),
    "topk_softmax": dict(n_experts=5, top_k=3, router="topk_softmax"),
    "shared": dict(n_experts=4, top_k=2, shared_expert={"d_ff": 24}),
    "shared_gated_geglu": dict(n_experts=3, top_k=1, expert={"d_ff": 8, "activation": "geglu"},
                               shared_expert={"d_ff": 8}, shared_expert_gate=True),
    "all_experts": dict(n_experts=3, top_k=3),
}


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("B,T", [(1, 1), (2, 13), (3, 300)])
def test_sparse_dispatch_equals_dense_computation(name, B, T):
    blk = make(**SETTINGS[name])
    x = torch.randn(B, T, D, dtype=torch.float64)
    y, state = blk(x)
    assert state is None
    assert rel_err(y, dense_moe(blk, x)[0]) < 1e-10


@pytest.mark.parametrize("name", ["top2", "shared_gated_geglu"])
def test_gradients_equal_dense_gradients(name):
    blk = make(**SETTINGS[name])
    x = torch.randn(2, 40, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 40, D, dtype=torch.float64)
    grads = []
    for fn in (lambda: blk(x)[0], lambda: dense_moe(blk, x)[0]):
        blk.zero_grad()
        x.grad = None
        (fn() * w).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in blk.parameters()])
    names = ["x"] + [n for n, _ in blk.named_parameters()]
    for n, g_sparse, g_dense in zip(names, *grads):
        assert g_dense.abs().sum() > 0, f"{n} gets no gradient"
        assert rel_err(g_sparse, g_dense) < 1e-10, n


def test_experts_without_tokens():
    """Positive inputs and router rows of opposite signs: experts 0 and 3 never win."""
    blk = make(n_experts=4, top_k=2)
    with torch.no_grad():
        sign = torch.tensor([-1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
        blk.router.weight.copy_(sign[:, None] * blk.router.weight.abs())
    x = torch.rand(2, 11, D, dtype=torch.float64) + 0.1
    y, _ = blk(x)
    _, chosen, _ = dense_moe(blk, x)
    assert set(chosen.unique().tolist()) == {1, 2}
    assert rel_err(y, dense_moe(blk, x)[0]) < 1e-10
    y.square().sum().backward()
    for e in (0, 3):
        assert all(p.grad is None for p in blk.experts[e].parameters())
    for e in (1, 2):
        assert all(p.grad.abs().sum() > 0 for p in blk.experts[e].parameters())
    assert blk.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["top1", "top2", "topk_softmax"])
def test_aux_loss_is_the_switch_formula(name):
    blk = make(aux_loss_coef=0.05, **SETTINGS[name])
    x = torch.randn(2, 37, D, dtype=torch.float64)
    with collect_aux_losses() as aux:
        blk(x)
    assert len(aux) == 1
    _, chosen, probs = dense_moe(blk, x)
    expected = 0.05 * switch_loss(chosen, probs, blk.spec.n_experts)
    assert abs(aux[0].item() - expected.item()) < 1e-12
    aux[0].backward()
    assert blk.router.weight.grad.abs().sum() > 0


def test_aux_loss_disabled_and_outside_a_model():
    blk = make(n_experts=4, top_k=2, aux_loss_coef=0.0)
    with collect_aux_losses() as aux:
        blk(torch.randn(1, 5, D, dtype=torch.float64))
    assert aux == []
    make(n_experts=4, top_k=2)(torch.randn(1, 5, D, dtype=torch.float64))  # no sink: ignored


def test_balanced_router_gives_k():
    """Every probability 1/E and every expert picked equally often: the loss is exactly k
    (the minimum of this top-k form)."""
    probs = torch.full((8, 4), 0.25, dtype=torch.float64)
    chosen = torch.tensor([[0, 1], [2, 3]] * 4)
    assert switch_loss(chosen, probs, 4).item() == pytest.approx(2.0)
    assert balance_loss(probs, chosen, 4).item() == pytest.approx(2.0)


def test_aux_loss_reaches_the_trainer():
    """A recipe with ffn: moe; model.aux_loss is the sum of every MoE layer's Switch loss."""
    r = recipe_from({
        "d_model": D, "vocab_size": 64, "max_seq_len": 64, "ffn": "moe",
        "blocks": {"attention": {"n_heads": 2},
                   "moe": {"n_experts": 4, "top_k": 2, "expert": {"d_ff": 16},
                           "aux_loss_coef": 0.02}},
        "schedule": {"layers": ["attention", "attention", "attention"]}})
    assert r.schedule.pattern == "*E*E*E"
    model = composer.build_model(r).double()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == 3

    def forward_and_expected(ids):
        seen = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0])))
                 for m in moes]
        logits = model(ids)
        for h in hooks:
            h.remove()
        assert len(seen) == 3
        return logits, sum(0.02 * switch_loss(*dense_moe(mod, inp)[1:], 4) for mod, inp in seen)

    ids = torch.randint(0, 64, (2, 17))
    logits, expected = forward_and_expected(ids)
    assert model.aux_loss is not None
    assert abs(model.aux_loss.item() - expected.item()) < 1e-6 * expected.item()
    # the trainer's loss: LM loss + aux; the aux part trains every router
    loss = F.cross_entropy(logits.view(-1, 64), ids.view(-1)) + model.aux_loss
    loss.backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in moes)
    _, expected = forward_and_expected(ids[:, :3])      # a new forward replaces the sum
    assert abs(model.aux_loss.item() - expected.item()) < 1e-6 * expected.item()


def test_flops_count_only_active_experts():
    blk = make(n_experts=8, top_k=2, shared_expert={"d_ff": 24}, shared_expert_gate=True)
    x = torch.randn(1, 16, D, dtype=torch.float64)
    with FlopCounterMode(display=False) as fc:
        blk(x)
    assert fc.get_total_flops() == 16 * MoE.flops_per_token(blk.spec, D, 16)
    dense_like = MoESpec(n_experts=8, top_k=8, expert={"d_ff": 16})
    sparse = MoESpec(n_experts=8, top_k=2, expert={"d_ff": 16})
    ffn = 3 * 2 * D * 16
    assert (MoE.flops_per_token(dense_like, D, 1) - MoE.flops_per_token(sparse, D, 1)
            == 6 * ffn)


def test_float32_matches_float64():
    blk = make(n_experts=4, top_k=2)
    x = torch.randn(2, 50, D, dtype=torch.float64)
    y64, _ = blk(x)
    y32, _ = blk.float()(x.float())
    assert rel_err(y32.double(), y64) < 1e-5


@pytest.mark.parametrize("settings,field", [
    (dict(n_experts=2, top_k=3), "top_k"),
    (dict(top_k=1, router="topk_softmax"), "router"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),
])
def test_problems(settings, field):
    assert [p[0] for p in MoESpec(**settings).problems(D, 64)] == [field]


def test_bad_moe_in_a_recipe_says_where():
    with pytest.raises(composer.RecipeError) as e:
        recipe_from({"d_model": D, "ffn": "moe", "blocks": {"moe": {"n_experts": 2,
                                                                     "top_k": 4}},
                     "schedule": {"layers": ["attention"]}})
    assert "model.blocks.moe.top_k" in str(e.value)
