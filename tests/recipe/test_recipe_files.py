"""Issue 13: recipe files of every kind a user has (binary by mistake, a copy of a packaged
model recipe, a root config without ``defaults:``, a checkpoint's recipe.json), symbols, nested
composite blocks, and the note on a depth the schedule-form rule replaced."""
import json
import shutil
from pathlib import Path

import pytest

import composer
from composer.core.errors import RecipeError
from omegaconf import OmegaConf

from composer.recipe.compose import _source, recipes_dir

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "tests" / "data" / "checkpoint_fd4e985"


def _hydra_settings(f):
    """The hydra section of the root config composed for file ``f`` (what train runs)."""
    _, where, name, _ = _source(str(f))
    return OmegaConf.to_container(OmegaConf.load(Path(where) / f"{name}.yaml"))["hydra"]


def _packaged_hydra():
    return OmegaConf.to_container(OmegaConf.load(recipes_dir() / "config.yaml"))["hydra"]


@pytest.mark.parametrize("content", [b"\x7fELF\x02\x01\x01\x00\x00\x00\xd0\x9d",
                                     bytes(range(256)) * 4])
@pytest.mark.parametrize("name", ["bin", "r.yaml"])
def test_binary_file_is_a_clear_recipe_error(tmp_path, content, name):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(RecipeError) as ei:
        composer.load_recipe(str(f))
    text = ei.value.render()
    assert "not a recipe file" in text and "binary" in text and "fix:" in text


def test_copy_of_packaged_model_recipe_is_that_recipe(tmp_path):
    f = tmp_path / "my_jamba.yaml"
    shutil.copy(recipes_dir() / "model" / "jamba_tiny.yaml", f)
    mine = composer.load_recipe(str(f), ["model.d_model=64"])
    packaged = composer.load_recipe("jamba_tiny", ["model.d_model=64"])
    assert mine.model_dump() == packaged.model_dump()


def test_root_file_without_defaults_inherits_packaged_ones(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("model:\n  n_layers: 8\ntrain:\n  steps: 7\n")
    r = composer.load_recipe(str(f))
    assert r.model.n_layers == 8 and r.train.steps == 7
    base = composer.load_recipe("config")
    assert r.model.schedule == base.model.schedule and r.data == base.data
    assert r.train.batch_size == base.train.batch_size
    assert _hydra_settings(f) == _packaged_hydra()  # run folders under runs/, not outputs/


def test_root_file_with_own_defaults_still_gets_run_dir(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("defaults:\n  - model: samba_tiny\n  - _self_\n")
    assert _hydra_settings(f) == _packaged_hydra()
    assert composer.load_recipe(str(f)).model == composer.load_recipe("samba_tiny").model


def test_config_group_next_to_the_file_still_resolves(tmp_path):
    (tmp_path / "model").mkdir()
    shutil.copy(recipes_dir() / "model" / "zamba_tiny.yaml", tmp_path / "model" / "mine.yaml")
    f = tmp_path / "exp.yaml"
    f.write_text("defaults:\n  - config\n  - override model: mine\n  - _self_\n")
    assert composer.load_recipe(str(f)).model == composer.load_recipe("zamba_tiny").model


def test_top_level_model_field_says_which_section(tmp_path):
    f = tmp_path / "mixed.yaml"
    f.write_text("d_model: 64\ntrain:\n  steps: 3\n")
    with pytest.raises(RecipeError) as ei:
        composer.load_recipe(str(f))
    assert "write it under 'model:'" in ei.value.render()


def test_checkpoint_recipe_json_loads_as_the_full_recipe(tmp_path):
    saved = json.loads((CKPT / "recipe.json").read_text())
    loaded = composer.load_recipe(str(CKPT / "recipe.json"))
    assert loaded.model_dump(mode="json") == composer.validate_recipe(saved).model_dump(
        mode="json")
    assert loaded.model_dump(mode="json")["model"] == saved["model"]
    assert composer.load_recipe(str(CKPT), ["model.d_model=64"]).model.d_model == 64
    bad = tmp_path / "recipe.json"
    bad.write_text('{"model": {"d_model": 0}')
    with pytest.raises(RecipeError) as ei:
        composer.load_recipe(str(bad))
    assert "recipe JSON" in ei.value.render()


@pytest.mark.parametrize("sym,name,words", [
    ("ZZ", "attention", "bad pattern symbol 'ZZ'"),
    ("|", "attention", "bad pattern symbol '|'"),
    ("M", "attention", "pick an unused symbol"),
    ("*", "mamba2", "already 'attention'"),
    ("P", "mamba2", "already 'parallel'"),
    ("Q", "nope", "names unknown block 'nope'"),
])
def test_bad_symbols_are_refused(sym, name, words):
    d = composer.compose_dict("config")
    d["model"]["symbols"] = {sym: name}
    with pytest.raises(RecipeError) as ei:
        composer.validate_recipe(d)
    assert words in ei.value.render() and "fix:" in ei.value.render()


def test_builtin_symbol_mapped_to_its_own_block_is_fine():
    r = composer.load_recipe("config", ["model.symbols.M=mamba2", "model.schedule.pattern=MM*"])
    assert r.schedule.pattern == "M-M-*-"


NESTED = ["model.blocks.outer.kind=parallel", "model.blocks.outer.branches=[inner,mamba2]",
          "model.blocks.inner.kind=parallel", "model.blocks.inner.branches=[attention,mamba2]"]


@pytest.mark.parametrize("where", ["model.schedule.layers=[outer,mamba2]",
                                   "model.schedule.layers=[mamba2,attention]"])
def test_composite_branch_of_a_composite_block_is_refused(where):
    with pytest.raises(RecipeError) as ei:
        composer.load_recipe("config", NESTED + [where])
    text = ei.value.render()
    assert "composite block 'inner' as a branch of 'outer'" in text
    assert "model.blocks.outer.branches[0]" in text and "fix:" in text


def test_accepted_parallel_graph_counts_the_built_model():
    r = composer.load_recipe("hymba_tiny", ["model.d_model=64"])
    g = composer.layer_graph(r)
    assert sum(a["params"] for _, a in g.nodes(data=True)) == \
        composer.build_model(r).num_params()


def test_depth_change_is_reported():
    from composer.recipe.compose import depth_change
    assert depth_change("config", ["model.schedule.pattern=M-M-M*-"]) == (4, "pattern", "ratio")
    assert depth_change("config", ["model.schedule.pattern=M*", "model.n_layers=4"]) is None
    assert depth_change("config", ["model.n_layers=6"]) is None
