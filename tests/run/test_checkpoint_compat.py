"""A checkpoint written by an earlier version still loads, into the same model.

``data/checkpoint_fd4e985`` was written by hycomp at commit fd4e985 (before composer/ and
blocks/ were restructured) from ``data/every_block.yaml``, a 16-sub-layer recipe with one block
of every registered family and a parallel sub-layer, weights perturbed off their init and one
AdamW step taken. Beside it, ``expected.safetensors`` holds that version's logits for fixed
tokens and, per parameter name, the sum of its optimizer's ``exp_avg_sq``. Loading it with
today's code must give the same logits (the parameter names and the computation are
unchanged) and put each optimizer state on the same parameter (the parameter order is
unchanged, or a resumed run would silently mix up Adam moments of same-shaped tensors).
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open

import composer
from composer.core.registry import block_types
from composer.run.checkpoint import load_checkpoint, read_recipe
from composer.run.train import param_groups

CKPT = Path(__file__).resolve().parents[1] / "data" / "checkpoint_fd4e985"


def _expected():
    with safe_open(str(CKPT / "expected.safetensors"), "pt") as f:
        names = json.loads(f.metadata()["param_names"])
        return {k: f.get_tensor(k) for k in f.keys()}, names


def _model_and_optimizer():
    recipe = composer.validate_recipe(read_recipe(CKPT))
    model = composer.build_model(recipe)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    load_checkpoint(CKPT, model, opt)
    return recipe, model.eval(), opt


# Blocks registered after fd4e985: an older checkpoint cannot hold them. A new block goes here
# (and into the next compatibility fixture), so adding one is a decision, not an accident.
NEWER_THAN_FIXTURE = {"base_conv"}


def test_the_fixture_covers_every_registered_block():
    recipe = composer.validate_recipe(read_recipe(CKPT))
    covered = {e.kind for e in recipe.schedule.entries}
    assert covered.isdisjoint(NEWER_THAN_FIXTURE)
    assert covered | NEWER_THAN_FIXTURE == set(block_types())


def test_old_checkpoint_gives_the_same_logits():
    exp, _ = _expected()
    _, model, _ = _model_and_optimizer()
    with torch.no_grad():
        logits = model(exp["input_ids"])
    torch.testing.assert_close(logits, exp["logits"], rtol=1e-5, atol=1e-6)


def test_old_checkpoint_puts_each_optimizer_state_on_its_parameter():
    exp, names = _expected()
    _, model, opt = _model_and_optimizer()
    assert [n for n, _ in model.named_parameters()] == names
    sums = torch.stack([opt.state[p]["exp_avg_sq"].sum() for _, p in model.named_parameters()])
    torch.testing.assert_close(sums, exp["exp_avg_sq_sums"], rtol=1e-6, atol=0)
