"""composer.run.checkpoint: safetensors + JSON checkpoints, atomic, with clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import composer
from composer.run.checkpoint import (latest_checkpoint, load_checkpoint, read_recipe,
                                 save_checkpoint)
from composer.core.errors import CheckpointError
from composer.run.train import param_groups

TINY = ["model.d_model=32", "model.n_layers=2", "data.seq_len=16"]


def _setup(overrides=(), seed=0):
    recipe = composer.load_recipe("config", overrides=TINY + list(overrides))
    torch.manual_seed(seed)
    model = composer.build_model(recipe)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    return recipe, model, opt


def _train(model, opt, steps=2):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 256, (2, 16), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _save(run, step, model, opt, recipe, keep=None):
    rng = {"batches": torch.Generator().manual_seed(7).get_state(),
           "torch": torch.get_rng_state()}
    return save_checkpoint(run, step, model, opt, {"tokens": step * 32},
                           recipe.model_dump(mode="json"), rng, keep=keep)


@pytest.fixture
def saved(tmp_path):
    recipe, model, opt = _setup()
    _train(model, opt)
    ckpt = _save(tmp_path, 2, model, opt, recipe)
    return tmp_path, ckpt, recipe, model, opt


def test_round_trip_restores_model_and_optimizer(saved):
    run, ckpt, recipe, model, opt = saved
    assert ckpt == run / "checkpoints" / "step_000002"
    assert latest_checkpoint(run) == ckpt
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    _, model2, opt2 = _setup(seed=99)
    out = load_checkpoint(ckpt, model2, opt2)
    assert out["trainer"]["step"] == 2 and out["trainer"]["tokens"] == 64
    assert out["recipe"] == read_recipe(ckpt) == recipe.model_dump(mode="json")
    assert torch.equal(out["rng"]["batches"], torch.Generator().manual_seed(7).get_state())
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        for k in s1[i]:
            assert torch.equal(s1[i][k], s2[i][k]), (i, k)
    # the restored pair takes exactly the same next step
    _train(model, opt, 1)
    _train(model2, opt2, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_tied_embedding_stored_once_and_no_pickle(saved):
    _, ckpt, _, model, _ = saved
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert "embed.weight" in names and not any(n.startswith("head") for n in names)
    with safe_open(ckpt / "optim.safetensors", framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["optim"])
    assert "state.0.exp_avg" in keys and "rng.torch" in keys
    assert len(meta["param_groups"]) == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optim.safetensors",
                                                      "recipe.json", "trainer.json"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "bad_json"])
def test_damaged_checkpoint_is_a_checkpoint_error(saved, damage):
    _, ckpt, _, _, _ = saved
    if damage == "bad_json":
        (ckpt / "trainer.json").write_text('{"step": 2,')
    else:
        f = ckpt / "model.safetensors"
        blob = bytearray(f.read_bytes())
        if damage == "truncate":
            blob = blob[: len(blob) // 2]
        else:
            blob[-10] ^= 0xFF
        f.write_bytes(bytes(blob))
    _, model2, opt2 = _setup()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt, model2, opt2)
    assert "damaged" in e.value.what and e.value.fix


def test_truncated_safetensors_without_checksum(saved):
    _, ckpt, _, _, _ = saved
    trainer = json.loads((ckpt / "trainer.json").read_text())
    trainer.pop("sha256")
    (ckpt / "trainer.json").write_text(json.dumps(trainer))
    f = ckpt / "optim.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    _, model2, opt2 = _setup()
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(ckpt, model2, opt2)


def test_missing_things(tmp_path, saved):
    run, ckpt, _, model, opt = saved
    with pytest.raises(CheckpointError, match="run folder not found"):
        latest_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        latest_checkpoint(tmp_path / "empty_run")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(run / "checkpoints" / "step_000099", model, opt)
    (ckpt / "optim.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete") as e:
        load_checkpoint(ckpt, model, opt)
    assert "optim.safetensors" in e.value.why


def test_other_model_is_a_checkpoint_error(saved):
    _, ckpt, _, _, _ = saved
    _, wider, opt = _setup(["model.d_model=64"])
    with pytest.raises(CheckpointError, match="does not fit the model") as e:
        load_checkpoint(ckpt, wider, opt)
    assert "embed.weight" in e.value.why and "(256, 32)" in e.value.why
    _, deeper, opt = _setup(["model.n_layers=4"])
    with pytest.raises(CheckpointError, match="does not fit the model") as e:
        load_checkpoint(ckpt, deeper, opt)
    assert "missing layers." in e.value.why


def test_leftover_temp_folder_is_ignored(saved):
    run, ckpt, _, _, _ = saved
    junk = run / "checkpoints" / ".tmp-step_000009-crashed"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(run) == ckpt
    (run / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(run) == ckpt


def test_keep_and_resave(tmp_path):
    recipe, model, opt = _setup()
    _train(model, opt, 1)
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, recipe, keep=2)
    _save(tmp_path, 4, model, opt, recipe, keep=2)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["latest", "step_000003", "step_000004"]
    assert latest_checkpoint(tmp_path).name == "step_000004"
