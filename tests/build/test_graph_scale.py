"""Issue 13: the layer graph of any depth or width answers fast, counting on the meta device
without building one module per sub-layer, and a model too large to exist is a clear error."""
import time

import pytest

import composer
from composer.build import costs
from composer.core.errors import RecipeError


def test_params_build_one_module_per_distinct_spec(monkeypatch):
    built = []
    real = costs.node_module
    monkeypatch.setattr(costs, "node_module",
                        lambda op, spec, m: built.append(op) or real(op, spec, m))
    r = composer.load_recipe("config", ["model.n_layers=400"])
    g = composer.layer_graph(r)
    sub_layers = [op for op in built if op in ("residual", "branch")]
    assert len(sub_layers) == 3  # mamba2, attention, mlp: not 800 sub-layers
    assert sum(a["params"] for _, a in g.nodes(data=True)) == \
        composer.build_model(r).num_params()


def test_parallel_and_overrides_counts_match_the_built_model():
    for name in ("hymba_tiny", "gemma3_tiny", "zamba_tiny", "jamba_tiny"):
        r = composer.load_recipe(name, ["model.d_model=64"])
        g = composer.layer_graph(r)
        assert sum(a["params"] for _, a in g.nodes(data=True)) == \
            composer.build_model(r).num_params(), name


def test_deep_graph_is_fast():
    r = composer.load_recipe("config", ["model.n_layers=10000"])  # 20,000 sub-layers
    t = time.perf_counter()
    g = composer.layer_graph(r)
    costs.totals(g, 256)
    assert time.perf_counter() - t < 15  # ~0.5 s alone; was ~60 s (a meta build per layer)
    assert g.number_of_nodes() == 20003


def test_too_wide_model_is_a_recipe_error_not_an_overflow():
    r = composer.load_recipe("config", ["model.d_model=1000000000"])
    t = time.perf_counter()
    with pytest.raises(RecipeError) as ei:
        composer.layer_graph(r)
    assert time.perf_counter() - t < 10
    assert "too large" in ei.value.render() and "d_model=1,000,000,000" in ei.value.render()


def test_wide_model_is_counted_on_meta():
    r = composer.load_recipe("config", ["model.d_model=1000000"])
    g = composer.layer_graph(r)
    assert costs.totals(g, 256)["params"] > 10**12
