"""Shared helpers: recipes made small by overrides, relative-error comparison."""
from __future__ import annotations

import copy

import pytest
import torch

import composer

TINY = ["model.d_model=32", "model.blocks.mamba2.d_state=8", "model.blocks.mamba2.head_dim=16",
        "model.blocks.attention.n_heads=2", "model.blocks.attention.n_kv_heads=1"]


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
