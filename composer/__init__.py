"""Hybrid Composer: compose, check, draw and train hybrid efficient language models.

Python API::

    import composer
    recipe = composer.load_recipe("config", overrides=["model.schedule.ratio=5:1"])
    graph = composer.layer_graph(recipe)      # networkx.DiGraph with params / FLOPs / state
    model = composer.build_model(recipe)      # nn.Module: model(input_ids) -> logits (B, T, V)
"""
from __future__ import annotations

__version__ = "0.1.0"

from composer.compose import compose_dict, load_recipe
from composer.errors import HycompError, RecipeError
from composer.graph import layer_graph
from composer.recipe import Recipe, validate_recipe


def build_model(recipe: Recipe, device=None):
    """The model of ``recipe``, compiled from its layer graph (``ComposedModel``)."""
    from composer.compile import ComposedModel
    import torch
    graph = layer_graph(recipe)
    with torch.device(device or "cpu"):
        return ComposedModel(graph, recipe.model, recipe.kernels)


__all__ = ["HycompError", "Recipe", "RecipeError", "build_model", "compose_dict",
           "layer_graph", "load_recipe", "validate_recipe"]
