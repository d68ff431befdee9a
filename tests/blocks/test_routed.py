"""Routed (adaptive-compute) sub-layer: per-token reference, skip semantics, both modes, state."""
import math

import pytest
import torch

import composer
from blocks.routed import Routed, RoutedSpec
from composer.core.aux import collect_aux_losses
from composer.core.registry import block_types

from helpers import recipe_from, rel_err

D = 32
ATTN = {"kind": "attention", "n_heads": 2, "n_kv_heads": 1}
SETTINGS = {
    "skip_attention": dict(mode="skip", paths=[ATTN]),
    "skip_mlp": dict(mode="skip", paths=[{"kind": "mlp", "d_ff": 16}], threshold=0.3),
    "choice_mixers": dict(mode="choice", paths=[ATTN, {**ATTN, "window": 3}]),
    "choice_mixed": dict(mode="choice", paths=[{**ATTN, "window": 4}, {"kind": "mlp"},
                                               {"kind": "moe", "n_experts": 3, "top_k": 2,
                                                "expert": {"d_ff": 8}}]),
}


def make(name, dtype=torch.float64) -> Routed:
    return Routed(RoutedSpec(**SETTINGS[name]), D).to(dtype)


def reference(blk: Routed, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the router's decision from its weights, then the chosen path's
    single-token ``step`` on a per-row, per-path state that only that path's tokens advance."""
    B, T, _ = x.shape
    s = blk.spec
    W, b = blk.router.weight, blk.router.bias
    states = [[p.init_state(1, x.device, x.dtype) for _ in range(B)] for p in blk.paths]
    y = torch.zeros_like(x)
    for r in range(B):
        for t in range(T):
            logit = W @ x[r, t] + b
            if s.mode == "skip":
                g = 1 / (1 + torch.exp(-logit[0]))
                if g <= s.threshold:
                    continue
                i = 0
            else:
                p = torch.exp(logit - logit.max())
                p = p / p.sum()
                i = int(p.argmax())
                g = p[i]
            out, states[i][r] = blk.paths[i].step(x[r, t][None], states[i][r])
            y[r, t] = g * out[0]
    return y


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 11), (2, 150)])
def test_output_equals_per_token_reference(name, B, T):
    blk = make(name)
    x = torch.randn(B, T, D, dtype=torch.float64)
    y, _ = blk(x)
    assert rel_err(y, reference(blk, x)) < 1e-10


@pytest.mark.parametrize("name", SETTINGS)
def test_whole_sequence_equals_carried_state_and_steps(name):
    blk = make(name)
    x = torch.randn(3, 70, D, dtype=torch.float64)
    y, _ = blk(x)
    st = blk.init_state(3, x.device, torch.float64)
    parts = []
    for a, b in [(0, 1), (1, 30), (30, 31), (31, 70)]:
        out, st = blk(x[:, a:b], st)
        parts.append(out)
    assert rel_err(torch.cat(parts, 1), y) < 1e-10
    st = blk.init_state(3, x.device, torch.float64)
    rows = []
    for t in range(20):
        yt, st = blk.step(x[:, t], st)
        rows.append(yt)
    assert rel_err(torch.stack(rows, 1), y[:, :20]) < 1e-10


def test_skipped_tokens_add_nothing_and_leave_the_state():
    blk = make("skip_attention")
    x = torch.randn(2, 40, D, dtype=torch.float64)
    _, path, gate = blk.decide(x)
    skipped = path == -1
    assert 0 < skipped.sum() < skipped.numel()
    assert torch.equal(skipped, gate <= 0.5)
    y, st = blk(x)
    assert torch.all(y[skipped] == 0) and torch.all(y[~skipped].abs().sum(-1) > 0)
    # the attention path's cache and position advanced on each row's routed tokens only
    for r in range(2):
        n = int((~skipped[r]).sum())
        assert st[0][r].pos == n and st[0][r].held() == n
    # a skipped token through step: output 0, the path state is the very same
    t = int(skipped[0].nonzero()[0])
    st0 = blk.init_state(2, x.device, torch.float64)
    yt, st1 = blk.step(x[:, t], st0)
    assert torch.all(yt[0] == 0) and st1[0][0] is st0[0][0]


def test_all_routed_is_the_gated_path_and_none_routed_is_zero():
    blk = make("skip_attention")
    x = torch.randn(2, 25, D, dtype=torch.float64)
    with torch.no_grad():
        blk.router.bias.fill_(50.0)
    y, _ = blk(x)
    g = torch.sigmoid(blk.router(x))                                       # (B, T, 1)
    assert rel_err(y, g * blk.paths[0](x)[0]) < 1e-10
    with torch.no_grad():
        blk.router.bias.fill_(-50.0)
    y, st = blk(x)
    assert torch.all(y == 0) and all(s.pos == 0 for s in st[0])


def test_choice_routes_every_token_to_one_path():
    blk = make("choice_mixed")
    x = torch.randn(2, 60, D, dtype=torch.float64)
    logits, path, gate = blk.decide(x)
    p = logits.softmax(-1)
    assert torch.equal(path, p.argmax(-1)) and rel_err(gate, p.amax(-1)) < 1e-15
    assert set(path.unique().tolist()) == {0, 1, 2}
    y, _ = blk(x)
    # a token's output is its path's output on the same input, scaled by its probability
    ffn_tokens = path == 1
    direct, _ = blk.paths[1](x[ffn_tokens][None])
    assert rel_err(y[ffn_tokens], gate[ffn_tokens][:, None] * direct[0]) < 1e-10


@pytest.mark.parametrize("name", ["skip_attention", "choice_mixed"])
def test_gradients_reach_router_and_paths(name):
    blk = make(name)
    y, _ = blk(torch.randn(2, 30, D, dtype=torch.float64))
    y.square().sum().backward()
    for n, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_skip_aux_loss_is_bce_toward_top_capacity():
    blk = Routed(RoutedSpec(paths=[ATTN], capacity=0.25, aux_loss_coef=0.1), D).double()
    x = torch.randn(2, 10, D, dtype=torch.float64)
    with collect_aux_losses() as aux:
        blk(x)
    r = (x @ blk.router.weight.T + blk.router.bias)[..., 0]                # (B, T)
    loss = 0.0
    for row in r:
        top = set(sorted(range(10), key=lambda t: -row[t].item())[:math.ceil(0.25 * 10)])
        for t in range(10):
            p = 1 / (1 + math.exp(-row[t].item()))
            loss -= math.log(p) if t in top else math.log(1 - p)
    assert len(aux) == 1 and abs(aux[0].item() - 0.1 * loss / 20) < 1e-12


def test_choice_aux_loss_is_load_balance_over_paths():
    blk = Routed(RoutedSpec(mode="choice", paths=[ATTN, {"kind": "mlp"}],
                            aux_loss_coef=0.1), D).double()
    x = torch.randn(3, 9, D, dtype=torch.float64)
    with collect_aux_losses() as aux:
        blk(x)
    p = (x @ blk.router.weight.T + blk.router.bias).reshape(-1, 2).softmax(-1)
    f = torch.stack([(p.argmax(-1) == i).double().mean() for i in range(2)])
    assert abs(aux[0].item() - 0.1 * 2 * (f * p.mean(0)).sum().item()) < 1e-12


def test_paths_are_validated_against_their_block_specs():
    spec = RoutedSpec(mode="choice", paths=["mlp", {"kind": "attention", "window": 8}])
    assert [type(p).__name__ for p in spec.paths] == ["MLPSpec", "AttentionSpec"]
    assert RoutedSpec.model_validate(spec.model_dump()) == spec
    for bad, words in [([{"kind": "atention"}], "did you mean 'attention'"),
                       ([{"kind": "attention", "n_head": 2}], "n_head"),
                       ([{"kind": "parallel", "branches": ["a", "b"]}], "composite"),
                       ([{"n_heads": 2}], "'kind'")]:
        with pytest.raises(ValueError, match=words):
            RoutedSpec(paths=bad)
    assert [p[0] for p in RoutedSpec(paths=["mlp", "mlp"]).problems(D, 64)] == ["paths"]
    assert [p[0] for p in RoutedSpec(mode="choice").problems(D, 64)] == ["paths"]
    probs = RoutedSpec(paths=[{"kind": "attention", "n_heads": 5}]).problems(D, 64)
    assert [p[0] for p in probs] == ["paths[0].n_heads"]


def test_cost_hooks():
    spec = RoutedSpec(paths=[ATTN], capacity=0.5)
    attn = block_types()["attention"].module
    a_spec = RoutedSpec(paths=[ATTN]).paths[0]
    assert Routed.flops_per_token(spec, D, 64) == 2 * D + 0.5 * attn.flops_per_token(a_spec, D,
                                                                                      32)
    assert Routed.state_bytes(spec, D, 64) == attn.state_bytes(a_spec, D, 64)
    choice = RoutedSpec(mode="choice", paths=[ATTN, "mlp"])
    assert Routed.state_bytes(choice, D, 64) == attn.state_bytes(a_spec, D, 64)


def test_routed_sub_layer_in_a_recipe():
    """A recipe places a routed sub-layer; the model runs, continues with state, and adds the
    router's auxiliary loss."""
    r = recipe_from({
        "d_model": D, "vocab_size": 64, "max_seq_len": 64, "ffn": "mlp",
        "blocks": {"attention": {"n_heads": 2},
                   "routed": {"paths": [ATTN]}},
        "schedule": {"pattern": "*Y"}})
    assert r.schedule.pattern == "*-Y-"
    model = composer.build_model(r).double()
    ids = torch.randint(0, 64, (2, 12))
    full = model(ids)
    assert model.aux_loss is not None and model.aux_loss > 0
    st = model.init_state(2, dtype=torch.float64)
    a, st = model(ids[:, :5], st, return_state=True)
    b, _ = model(ids[:, 5:], st, return_state=True)
    assert rel_err(torch.cat([a, b], 1), full) < 1e-10
    with pytest.raises(composer.RecipeError, match=r"model.blocks.mod.paths\[0\].n_heads"):
        recipe_from({"d_model": D, "blocks": {"mod": {"kind": "routed",
                                                      "paths": [{**ATTN, "n_heads": 5}]}},
                     "schedule": {"layers": ["mod"]}})
