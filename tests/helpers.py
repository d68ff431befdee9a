"""Helpers several test modules use: recipes with a replaced model section, relative error,
the settings of the tiny runs that compare's tests train."""
from __future__ import annotations

import copy

import torch

import composer


def recipe_from(model: dict, base: str = "config", **sections):
    """Validate the default recipe with its ``model`` section replaced by ``model``."""
    d = composer.compose_dict(base)
    d["model"] = copy.deepcopy(model)
    d.update(sections)
    return composer.validate_recipe(d)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (NaN anywhere counts as failure)."""
    assert not torch.isnan(a).any() and not torch.isnan(b).any(), "NaN in output"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tiny_run(steps: int) -> list[str]:
    """Overrides of a run of ``steps`` steps that trains in about a second (compare's tests)."""
    return ["model.d_model=32", "model.n_layers=4", "data.max_bytes=100000", "data.seq_len=32",
            "train.batch_size=2", f"train.steps={steps}", "train.warmup_steps=1",
            "train.eval_every=2", "train.eval_batches=1", "train.progress=false",
            "train.threads=1", "train.sample_tokens=0"]
