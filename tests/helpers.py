"""Helpers several test modules use: recipes with a replaced model section, relative error."""
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
