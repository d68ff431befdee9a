"""Loading recipes: Hydra composition, overrides, the schedule-form rule, recipe files."""
import json
import textwrap

import pytest

import composer
from composer.recipe.compose import full_overrides, group_options
from composer.core.errors import RecipeError


def test_default_recipe_is_a_3_to_1_hybrid():
    r = composer.load_recipe()
    names = [e.name for e in r.schedule.entries if e.role == "mixer"]
    assert names.count("mamba2") == 3 * names.count("attention")


def test_every_packaged_model_recipe_validates():
    for name in group_options("model"):
        r = composer.load_recipe(name)
        assert len(r.schedule) > 0


def test_value_override_and_model_name():
    r = composer.load_recipe("gemma3_tiny", ["model.d_model=64"])
    assert r.model.d_model == 64
    r2 = composer.load_recipe("config", ["model=gemma3_tiny", "model.d_model=64"])
    assert r2.model_dump() == r.model_dump()


def test_pattern_on_command_line_replaces_ratio_and_takes_its_length():
    extra = full_overrides("config", ["model.schedule.pattern=M-M-M*-"])
    assert "model.schedule.ratio=null" in extra and "model.n_layers=null" in extra
    r = composer.load_recipe("config", ["model.schedule.pattern=M-M-M*-"])
    assert r.model.schedule.ratio is None and len(r.schedule) == 7


def test_pattern_with_explicit_depth_repeats():
    r = composer.load_recipe("config", ["model.schedule.pattern=M*", "model.n_layers=6"])
    assert [e.kind for e in r.schedule.entries if e.role == "mixer"] == ["mamba2", "attention"] * 3


def test_ratio_override_keeps_depth():
    r = composer.load_recipe("config", ["model.schedule.ratio=5:1", "model.n_layers=12"])
    # 2 attention layers; 10 Mamba-2 in runs 3 | 4 | 3 (the run length 10/3 walked by halves)
    assert r.schedule.pattern.replace("-", "") == "MMM*MMMM*MMM"
    assert len([e for e in r.schedule.entries if e.role == "mixer"]) == 12


def test_block_fields_absent_from_yaml_can_be_set():
    r = composer.load_recipe("config", ["model.blocks.attention.rope_theta=500000",
                                        "model.blocks.mamba2.d_conv=3"])
    assert r.model.spec("attention").rope_theta == 500000
    assert r.model.spec("mamba2").d_conv == 3


def test_new_block_name_from_command_line():
    r = composer.load_recipe("config", ["model.blocks.local.kind=attention",
                                        "model.blocks.local.window=16",
                                        "model.schedule.layers=[mamba2,local]"])
    assert [e.name for e in r.schedule.entries if e.role == "mixer"] == ["mamba2", "local"]


@pytest.mark.parametrize("override,words", [
    ("model.n_layer=12", "did you mean 'n_layers'"),
    ("model.blocks.attention.nheads=2", "did you mean 'n_heads'"),
    # a block the recipe file does not list: the wrong field is named, not the block
    ("model.blocks.gated_deltanet.head_dim=16", "did you mean 'head_v_dim'"),
    ("trian.steps=3", "did you mean 'train'"),
    ("model=jamab", "packaged model recipes"),
    ("model.d_model=abc", "valid integer"),
    ("model.schedule.ratio=3:x", "non-negative integers"),
    ("model.schedule.layers=[mamba2,atention]", "did you mean 'attention'"),
    ("kernels.attention=fast", "sdpa"),
    ("model.d_model=[1,2", "cannot parse"),
])
def test_bad_overrides_are_clear(override, words):
    with pytest.raises(RecipeError) as ei:
        composer.load_recipe("config", [override])
    text = ei.value.render()
    assert words in text and "fix:" in text, text


def test_recipe_file_with_defaults(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(textwrap.dedent("""
        defaults:
          - config
          - _self_
        model:
          d_model: 64
          schedule:
            ratio: "1:1"
    """))
    r = composer.load_recipe(str(f), ["model.n_layers=6"])
    assert r.model.d_model == 64
    assert [e.kind for e in r.schedule.entries if e.role == "mixer"].count("attention") == 3


def test_unquoted_yaml_ratio_is_explained(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("defaults:\n  - config\n  - _self_\nmodel:\n  schedule:\n    ratio: 3:1\n")
    with pytest.raises(RecipeError) as ei:
        composer.load_recipe(str(f))
    assert "Quote the ratio" in ei.value.render()


def test_recipe_is_data_target_keys_are_rejected_not_run(tmp_path):
    marker = tmp_path / "ran"
    f = tmp_path / "evil.yaml"
    f.write_text(textwrap.dedent(f"""
        defaults:
          - config
          - _self_
        model:
          _target_: os.system
          _args_: ["touch {marker}"]
    """))
    with pytest.raises(RecipeError) as ei:
        composer.load_recipe(str(f))
    assert "unknown key '_target_'" in ei.value.render()
    assert not marker.exists()


def test_python_yaml_tags_are_refused(tmp_path):
    f = tmp_path / "tag.yaml"
    f.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError) as ei:
        composer.load_recipe(str(f))
    assert "Python object tags are not allowed" in ei.value.render()


def test_malformed_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("model:\n  d_model: [1, 2\n")
    with pytest.raises(RecipeError) as ei:
        composer.load_recipe(str(f))
    assert "broken.yaml:3" in ei.value.render()


def test_missing_recipe_file():
    with pytest.raises(RecipeError) as ei:
        composer.load_recipe("/nonexistent/recipe.yaml")
    assert "not found" in ei.value.render()


def test_schema_is_json_and_documents_fields():
    from composer.recipe.schema import Recipe
    schema = Recipe.model_json_schema()
    json.dumps(schema)
    props = schema["$defs"]["ModelConfig"]["properties"]
    assert "description" in props["n_layers"] and "additionalProperties" in \
        schema["$defs"]["ModelConfig"]
