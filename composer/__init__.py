"""Hybrid Composer: compose, check, draw and train hybrid efficient language models.

Python API::

    import composer
    recipe = composer.load_recipe("config", overrides=["model.schedule.ratio=5:1"])
    graph = composer.layer_graph(recipe)      # networkx.DiGraph with params / FLOPs / state
    model = composer.build_model(recipe)      # nn.Module: model(input_ids) -> logits (B, T, V)

Names are imported on first use, so ``hycomp --help`` starts without loading torch.

One subpackage per stage of the data flow, each importing only earlier ones:
``core`` (the contract blocks and ops plug into) → ``recipe`` (YAML + overrides → a validated
recipe) → ``build`` (layer graph with costs → ``nn.Module``) → ``run`` (training) and ``viz``
(pictures) → ``cli`` (the ``hycomp`` command).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_recipe": "composer.recipe.compose", "compose_dict": "composer.recipe.compose",
    "layer_graph": "composer.build.costs", "Recipe": "composer.recipe.schema",
    "validate_recipe": "composer.recipe.validate", "HycompError": "composer.core.errors",
    "RecipeError": "composer.core.errors",
}


def build_model(recipe, device=None):
    """The model of ``recipe``, compiled from its layer graph (``ComposedModel``)."""
    import torch

    from composer.build.model import ComposedModel
    from composer.build.costs import layer_graph
    graph = layer_graph(recipe)
    if device is None:
        return ComposedModel(graph, recipe.model, recipe.kernels)
    with torch.device(device):
        return ComposedModel(graph, recipe.model, recipe.kernels)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'composer' has no attribute '{name}'")


__all__ = ["HycompError", "Recipe", "RecipeError", "build_model", "compose_dict",
           "layer_graph", "load_recipe", "validate_recipe"]
