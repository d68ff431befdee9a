"""The layer graph is the model: structure, parameter counts, shared weights, parallel branches."""
import networkx as nx
import pytest
import torch

import composer
from composer.cli.main import check_report
from composer.recipe.compose import group_options
from composer.build.costs import totals
from composer.build.graph import execution_order

from helpers import rel_err

SMALL = ["model.d_model=32"]


def small(name, extra=()):
    over = list(SMALL) + list(extra)
    r = composer.load_recipe(name, over)
    return r


@pytest.mark.parametrize("name", group_options("model"))
def test_param_count_equals_built_model(name):
    r = small(name)
    g = composer.layer_graph(r)
    m = composer.build_model(r)
    assert totals(g, 64)["params"] == m.num_params() == sum(p.numel() for p in m.parameters())


def test_untied_head_has_parameters():
    r = small("config", ["model.tie_embeddings=false"])
    g = composer.layer_graph(r)
    assert g.nodes["head"]["params"] == 32 * 256
    assert totals(g, 8)["params"] == composer.build_model(r).num_params()


def test_sequential_graph_structure():
    r = small("config")
    g = composer.layer_graph(r)
    order = execution_order(g)
    assert order[0] == "embed" and order[-2:] == ["norm", "head"]
    assert order[1:-2] == [f"L{i}" for i in range(len(r.schedule))]
    assert nx.is_directed_acyclic_graph(g)
    for a, b in zip(order, order[1:]):
        assert g.edges[a, b]["kind"] == "data"
    assert g.graph["pattern"] == r.schedule.pattern


def test_shared_block_is_one_module_visited_twice():
    r = small("zamba_tiny")
    g = composer.layer_graph(r)
    visits = [n for n, a in g.nodes(data=True) if a.get("name") == "shared_attn"]
    assert len(visits) == 2
    first, second = visits
    assert g.nodes[second]["shares"] == first and g.nodes[second]["params"] == 0
    assert g.nodes[first]["params"] > 0 and g.edges[first, second]["kind"] == "shares"
    m = composer.build_model(r)
    assert len(m.shared) == 1
    calls = []
    m.shared["shared_attn"].register_forward_hook(lambda *a: calls.append(1))
    m(torch.randint(0, 256, (1, 8)))
    assert len(calls) == 2


def test_parallel_branches_are_nodes_and_run():
    r = small("hymba_tiny")
    g = composer.layer_graph(r)
    assert g.nodes["L0"]["op"] == "combine"
    branches = sorted(p for p in g.predecessors("L0") if g.nodes[p]["op"] == "branch")
    assert [g.nodes[b]["kind"] for b in branches] == ["attention", "mamba2"]
    assert g.edges["embed", "L0"]["kind"] == "residual"
    rep = check_report(r, g, 16)
    assert [b["kind"] for b in rep["sublayers"][0]["branches"]] == ["attention", "mamba2"]
    m = composer.build_model(r)
    logits = m(torch.randint(0, 256, (2, 12)))
    logits.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name", ["config", "zamba_tiny", "hymba_tiny", "gemma3_tiny"])
def test_modules_run_in_graph_order(name):
    r = small(name, ["model.n_layers=6"] if name == "gemma3_tiny" else [])
    m = composer.build_model(r)
    seen = []
    for key in {key for _, op_, key, _, _ in m.plan if op_ in ("residual", "branch")}:
        m.get_submodule(key).register_forward_hook(lambda mod, i, o, key=key: seen.append(key))
    m(torch.randint(0, 256, (1, 5)))
    g = m.graph
    expected = [g.nodes[n]["module_key"] for n in execution_order(g)
                if g.nodes[n]["op"] in ("residual", "branch")]
    assert seen == expected


@pytest.mark.parametrize("name,extra", [
    ("config", []), ("gemma3_tiny", ["model.n_layers=6", "model.blocks.attention.window=4"]),
    ("zamba_tiny", []), ("hymba_tiny", ["model.blocks.swa.window=3"]),
    ("multilevel_tiny", ["model.blocks.local.window=5"]), ("nemotron_h_tiny", [])])
def test_model_state_carries_across_calls(name, extra):
    r = small(name, extra)
    m = composer.build_model(r).double()
    ids = torch.randint(0, 256, (2, 19))
    full = m(ids)
    st = m.init_state(2, dtype=torch.float64)
    a, st = m(ids[:, :7], st, return_state=True)
    b, st = m(ids[:, 7:18], st, return_state=True)
    c, _ = m(ids[:, 18:], st, return_state=True)
    assert rel_err(torch.cat([a, b, c], 1), full) < 1e-9


@pytest.mark.parametrize("name", group_options("model"))
def test_every_model_recipe_trains_one_step(name):
    r = small(name)
    m = composer.build_model(r)
    V = r.model.vocab_size                      # bytes, or a task's vocabulary (zoology_mqar)
    ids = torch.randint(0, V, (2, 16))
    logits = m(ids)
    assert logits.shape == (2, 16, V)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V),
                                             ids[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)


def test_bf16_autocast_forward():
    m = composer.build_model(small("config"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randint(0, 256, (1, 9)))
    assert torch.isfinite(out.float()).all()


def test_flops_grow_with_context_only_for_global_attention():
    g = composer.layer_graph(small("config"))
    att = [n for n, a in g.nodes(data=True) if a.get("kind") == "attention"][0]
    mam = [n for n, a in g.nodes(data=True) if a.get("kind") == "mamba2"][0]
    assert g.nodes[att]["flops"](4096) > g.nodes[att]["flops"](256)
    assert g.nodes[mam]["flops"](4096) == g.nodes[mam]["flops"](256)
    assert g.nodes[att]["state_bytes"](4096) == 16 * g.nodes[att]["state_bytes"](256)
