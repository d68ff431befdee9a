"""The four schedule forms, both ways of counting layers, per-layer overrides."""
import pytest

import composer
from composer.core.errors import RecipeError

from helpers import recipe_from


def mixers(recipe):
    return [e.name for e in recipe.schedule.entries if e.role != "ffn"]


def sym(recipe):
    return recipe.schedule.pattern


def test_ratio_even_hf_counting_12_layers():
    r = composer.load_recipe("config", ["model.n_layers=12"])
    assert sym(r).replace("-", "") == "MM*MMM*MM*MM"
    assert r.schedule.counting == "hf" and len(r.schedule) == 24
    assert [e.layer for e in r.schedule.entries][:4] == [0, 0, 1, 1]


def test_ratio_period_12_layers():
    r = composer.load_recipe("config", ["model.n_layers=12", "model.schedule.placement=period"])
    assert sym(r).replace("-", "") == "MMM*MMM*MMM*"


def test_ratio_three_parts():
    r = recipe_from({"n_layers": 8, "ffn": None, "schedule": {
        "ratio": "2:1:1", "blocks": ["mamba2", "attention", "mlp"]}})
    names = mixers(r) + [e.name for e in r.schedule.entries if e.role == "ffn"]
    assert names.count("attention") == 2 and names.count("mlp") == 2
    assert r.schedule.counting == "megatron" and len(r.schedule) == 8


def test_pattern_megatron_counting_and_repeat():
    r = composer.load_recipe("config", ["model.schedule.pattern=M-M-M*-"])
    assert sym(r) == "M-M-M*-" and r.schedule.counting == "megatron" and len(r.schedule) == 7
    r = composer.load_recipe("config", ["model.schedule.pattern=M|*", "model.n_layers=5"])
    assert mixers(r) == ["mamba2", "attention", "mamba2", "attention", "mamba2"]
    assert r.schedule.counting == "hf"  # no FFN symbol: each entry gets the automatic MLP


def test_explicit_layers():
    r = composer.load_recipe("config", ["model.schedule.layers=[attention,mamba2,mamba2]"])
    assert mixers(r) == ["attention", "mamba2", "mamba2"]


def test_segments_multilevel():
    r = composer.load_recipe("multilevel_tiny")
    assert mixers(r)[:2] == ["local", "local"]
    assert "".join("*" if n == "attention" else "M" for n in mixers(r)[2:]) == "MM*MM*MM"


def test_gemma3_override_selects_global_layers():
    r = composer.load_recipe("gemma3_tiny")
    windows = [e.spec.window for e in r.schedule.entries if e.kind == "attention"]
    assert [i for i, w in enumerate(windows) if w is None] == [5, 11, 17, 23]
    assert all(w == 64 for i, w in enumerate(windows) if i not in (5, 11, 17, 23))


@pytest.mark.parametrize("select,expect", [
    ({"indices": [0, -1]}, [0, 5]), ({"every": 2, "offset": 1}, [1, 3, 5]),
    ({"first": 2}, [0, 1]), ({"last": 2}, [4, 5]),
    ({"every": 2, "block": "attention"}, [2]),
])
def test_selectors(select, expect):
    r = recipe_from({"n_layers": 6, "ffn": None, "schedule": {
        "layers": ["mamba2", "mamba2", "attention", "mamba2", "mamba2", "attention"],
        "overrides": [{"select": select, "block": "mlp"}]}})
    assert [e.index for e in r.schedule.entries if e.kind == "mlp"] == expect


def test_override_swaps_ffn_jamba_style():
    r = recipe_from({"n_layers": 4, "blocks": {"big": {"kind": "mlp", "d_ff": 256}},
                     "schedule": {"pattern": "M", "overrides": [
                         {"select": {"every": 2, "offset": 1}, "ffn": "big"}]}})
    ffns = [e.name for e in r.schedule.entries if e.role == "ffn"]
    assert ffns == ["mlp", "big", "mlp", "big"]


def test_shared_block_one_module_key():
    r = composer.load_recipe("zamba_tiny")
    keys = [e.module_key for e in r.schedule.entries if e.name == "shared_attn"]
    assert len(keys) == 2 and len(set(keys)) == 1


@pytest.mark.parametrize("model,where,words", [
    ({"n_layers": 4, "schedule": {"ratio": "3:-1", "blocks": ["mamba2", "attention"]}},
     "model.schedule.ratio", "non-negative integers"),
    ({"n_layers": 4, "schedule": {"ratio": "0:0", "blocks": ["mamba2", "attention"]}},
     "model.schedule.ratio", "sum to zero"),
    ({"n_layers": 4, "schedule": {"ratio": "3:1", "blocks": ["mamba2"]}},
     "model.schedule.ratio", "parts"),
    ({"n_layers": 4, "schedule": {"ratio": "3:1"}}, "model.schedule.blocks", "needs the block"),
    ({"schedule": {"ratio": "3:1", "blocks": ["mamba2", "attention"]}}, "model.n_layers",
     "not how many"),
    ({"schedule": {"pattern": "M?M"}}, "model.schedule.pattern", "known symbols"),
    ({"n_layers": 3, "schedule": {"layers": ["mamba2", "attention"]}},
     "model.schedule.layers", "does not match the depth"),
    ({"n_layers": 2, "schedule": {"pattern": "M*M"}}, "model.schedule.pattern", "longer"),
    ({"schedule": {"layers": ["mamba2", "atention"]}}, "model.schedule.layers[1]",
     "did you mean 'attention'"),
    ({"schedule": {"layers": ["mamba2"], "pattern": "M"}}, "model.schedule", "exactly one"),
    ({"schedule": {}}, "model.schedule", "set one of"),
    ({"blocks": {"x": {"kind": "mamba3"}}, "schedule": {"layers": ["x"]}},
     "model.blocks.x.kind", "registered block types"),
    ({"blocks": {"attention": {"n_heads": 3}}, "schedule": {"layers": ["attention"]}},
     "model.blocks.attention.n_heads", "not divisible"),
    ({"blocks": {"attention": {"n_kv_heads": 3}}, "schedule": {"layers": ["attention"]}},
     "model.blocks.attention.n_kv_heads", "does not divide"),
    ({"max_seq_len": 128, "blocks": {"attention": {"window": 128}},
      "schedule": {"layers": ["attention"]}}, "model.blocks.attention.window", "max_seq_len"),
    ({"blocks": {"attention": {"n_head": 4}}, "schedule": {"layers": ["attention"]}},
     "model.blocks.attention.n_head", "did you mean 'n_heads'"),
    ({"schedule": {"layers": ["mamba2"], "overrides": [{"select": {"indices": [9]}}]}},
     "model.schedule.overrides[0].select.indices", "out of range"),
    ({"schedule": {"layers": ["mamba2"], "overrides": [
        {"select": {"indices": [0]}, "set": {"window": 4}}]}},
     "model.schedule.overrides[0].set.window", "mamba2 block"),
    ({"schedule": {"layers": ["mamba2"], "overrides": [
        {"select": {"block": "atention"}, "block": "mlp"}]}},
     "model.schedule.overrides[0].select.block", "not in the schedule"),
    ({"ffn": "attention", "schedule": {"layers": ["mamba2"]}}, "model.ffn", "not an FFN"),
    ({"shared": ["attention"], "schedule": {"layers": ["mamba2"]}}, "model.shared",
     "never placed"),
    ({"d_model": 0, "schedule": {"layers": ["mamba2"]}}, "model.d_model", "greater than"),
    ({"norm": "batchnorm", "schedule": {"layers": ["mamba2"]}}, "model.norm", "rmsnorm"),
])
def test_bad_models_name_key_path_and_fix(model, where, words):
    with pytest.raises(RecipeError) as ei:
        recipe_from(model)
    text = ei.value.render()
    assert f"where: {where}" in text, text
    assert words in text, text
    assert "fix:" in text


def test_yaml_sexagesimal_ratio_is_explained():
    with pytest.raises(RecipeError) as ei:
        recipe_from({"n_layers": 4, "schedule": {"ratio": 181, "blocks": ["mamba2", "attention"]}})
    assert "base-60" in ei.value.render() and "3:1" in ei.value.render()


def test_unknown_kernel_backend_and_op():
    d = composer.compose_dict("config")
    d["kernels"] = {"attention": "flash", "atention": "auto"}
    with pytest.raises(RecipeError) as ei:
        composer.validate_recipe(d)
    text = ei.value.render()
    assert "where: kernels.attention" in text and "sdpa" in text
    assert "where: kernels.atention" in text and "did you mean 'attention'" in text


def test_retired_op_name_says_what_replaced_it():
    d = composer.compose_dict("config")
    d["kernels"] = {"selective_scan": "chunked"}
    with pytest.raises(RecipeError) as ei:
        composer.validate_recipe(d)
    assert "kernels.gated_linear_recurrence" in ei.value.render()


def test_all_problems_reported_at_once():
    with pytest.raises(RecipeError) as ei:
        recipe_from({"blocks": {"attention": {"n_heads": 3, "n_kv_heads": 2}},
                     "schedule": {"layers": ["attention", "mamba2"]}})
    assert len(ei.value.problems) == 2


@pytest.mark.parametrize("name,mixers,ffns", [
    ("jamba_tiny", "mmmm*mmm" * 2, "-E" * 8),
    ("samba_tiny", "mS" * 4, "-" * 8),
    ("gemma3_tiny", "*" * 24, "-" * 24),
    ("qwen3_next_tiny", "GGG*" * 2, "E" * 8),
    ("minimax01_tiny", "LLLLLLL*", "E" * 8),
    ("recurrentgemma_tiny", "rrA" * 3, "-" * 9),
    ("zamba_tiny", "MMM*" * 2, "-" * 8),
    ("hymba_tiny", "PPPP", "-" * 4),
    ("nemotron_h_tiny", "M-M-M*-M-M-M-M*-", ""),
])
def test_well_known_layouts(name, mixers, ffns):
    r = composer.load_recipe(name)
    pat = r.schedule.pattern
    if r.schedule.counting == "hf":
        assert pat[0::2] == mixers and pat[1::2] == ffns
    else:
        assert pat == mixers and not ffns


def test_jamba_attention_every_8_at_offset_4_and_moe_every_2():
    r = composer.load_recipe("jamba_tiny")
    mix = [e for e in r.schedule.entries if e.role == "mixer"]
    ffn = [e for e in r.schedule.entries if e.role == "ffn"]
    assert [e.layer for e in mix if e.kind == "attention"] == [4, 12]
    assert [e.layer for e in ffn if e.kind == "moe"] == list(range(1, 16, 2))
