"""Validation: a plain dict (the composed Hydra config) in, a :class:`Recipe` out, or one
:class:`RecipeError` listing every problem with its key path, bad value, reason and fix.

Three passes: the schema (field types and ranges, unknown keys), the kernel choices against the
registered backends and a synthetic task's settings (that it can make a sequence, and that its
tokens fit ``model.vocab_size``), then the schedule expansion with every block's own spec
(:func:`composer.recipe.schedule.expand_schedule`). The expansion is stored on the recipe
(``recipe.schedule``), which the build reads.
"""
from __future__ import annotations

from pydantic import ValidationError

from composer.core.registry import did_you_mean, ops
from composer.recipe.problems import Problems, bundle, pydantic_problems
from composer.recipe.schedule import expand_schedule
from composer.recipe.schema import Recipe

RETIRED_OPS = {
    "selective_scan": "Mamba-1 and RG-LRU now run on 'gated_linear_recurrence' (auto picks "
                      "its 'scan' backend for them): set kernels.gated_linear_recurrence",
}
"""Op names recipes may still carry from earlier versions -> what replaced them."""


def validate_recipe(data: dict) -> Recipe:
    """Validate a plain-dict recipe; raise one :class:`RecipeError` listing every problem."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise bundle(_section_hints(pydantic_problems(err))) from None
    probs = Problems()
    _check_kernels(recipe.kernels, probs)
    _check_task(recipe, probs)
    recipe._schedule = expand_schedule(recipe.model, probs)
    return recipe


def _section_hints(probs: list) -> list:
    """An unknown top-level key that is a field of a section says which section it belongs
    in (a copy of a model recipe has ``d_model:`` where a recipe has ``model: {d_model:}``)."""
    for p in probs:
        key = (p.where or "").split(".")[0]
        if p.what.startswith("unknown key") and p.where == key:
            homes = [n for n, f in Recipe.model_fields.items()
                     if key in getattr(f.annotation, "model_fields", {})]
            if homes:
                p.fix = (f"'{key}' is a field of {homes[0]}: write it under '{homes[0]}:' "
                         f"({homes[0]}: {{{key}: ...}})")
    return probs


def _check_task(recipe: Recipe, probs: Problems) -> None:
    data = recipe.data
    if data.task == "text":
        return
    for what, key, why, fix in data.problems():
        probs.add(what, f"data.{key}", why, fix)
    need, vocab = data.vocab_needed(), recipe.model.vocab_size
    if need > vocab:
        probs.add(f"task {data.task} needs a vocabulary of {need} tokens", "model.vocab_size",
                  f"the task emits token ids up to {need - 1}; the model's embedding holds "
                  f"model.vocab_size={vocab}",
                  f"set model.vocab_size={need}, or lower data.vocab_size to {vocab}")


def _check_kernels(kernels: dict[str, str], probs: Problems) -> None:
    table = ops()
    for op, choice in kernels.items():
        if op not in table:
            probs.add(f"unknown op '{op}'", f"kernels.{op}",
                      f"ops are: {', '.join(sorted(table))}",
                      RETIRED_OPS.get(op) or "use one of those" + did_you_mean(op, table))
        elif choice != "auto" and choice not in table[op]:
            valid = ["auto", *table[op]]
            probs.add(f"unknown kernel backend '{choice}'", f"kernels.{op}",
                      f"backends of '{op}': {', '.join(valid)}",
                      "use one of those" + did_you_mean(choice, valid))
