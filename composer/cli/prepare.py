"""The one path from command line to a runnable recipe, shared by ``check``, ``viz`` and
``train``: compose and validate, then check what only this machine can say (the device exists,
the named kernel backends take the model's shapes). Whatever ``train`` refuses, ``check`` and
``viz`` refuse too. Also the notes a command prints about a valid recipe that may surprise.
"""
from __future__ import annotations

from composer.core.errors import HycompError


def load_runnable(name_or_path: str, overrides) -> object:
    """:func:`composer.load_recipe` plus :func:`check_runnable`."""
    import composer
    recipe = composer.load_recipe(name_or_path, list(overrides))
    check_runnable(recipe)
    return recipe


def check_runnable(recipe, probed: set | None = None) -> None:
    """The device must exist here; named kernel backends are probed on two tokens (once per
    distinct model / kernels / device / dtype when ``probed`` is given)."""
    import json

    from composer.run.runtime import pick_device
    pick_device(recipe.train.device)
    if all(choice == "auto" for choice in recipe.kernels.values()):
        return
    key = json.dumps([recipe.model.model_dump(mode="json"), recipe.kernels, recipe.train.device,
                      recipe.train.dtype], sort_keys=True, default=str)
    if probed is not None:
        if key in probed:
            return
        probed.add(key)
    probe_kernels(recipe)


def probe_kernels(recipe) -> None:
    """Run the model once on two tokens with the recipe's kernel choices, on the device and in
    the dtype training will use. An explicit backend may refuse the shapes a block hands it
    (``scan`` takes one value column per head): only a call shows that. A HycompError (the
    registry's) propagates."""
    import torch

    import composer
    from composer.run.runtime import pick_device
    from composer.run.sources import autocast
    device = pick_device(recipe.train.device)
    model = composer.build_model(recipe).to(device)
    ids = torch.zeros(1, min(2, recipe.model.max_seq_len), dtype=torch.long, device=device)
    with torch.no_grad(), autocast(device, recipe.train.dtype):
        model(ids)


def context_length(arg: int | None, recipe) -> int:
    """``-T N`` (default ``data.seq_len``); N must be a positive number of tokens."""
    if arg is None:
        return recipe.data.seq_len
    if arg < 1:
        raise HycompError(what=f"bad context length {arg}", where=f"-T {arg}",
                          why="FLOPs and state are per token at a context of T >= 1 tokens",
                          fix="give -T a positive number, e.g. -T 2048 (default: "
                              "data.seq_len)")
    return arg


def notes(name_or_path: str, overrides, recipe) -> list[str]:
    """What the user may not expect of a valid recipe: a depth replaced by the schedule-form
    rule, minority entries side by side under ``even`` placement."""
    from composer.recipe.compose import depth_change
    out = []
    change = depth_change(name_or_path, list(overrides))
    depth = len(recipe.schedule.names)
    if change and change[0] != depth:
        old, form, base_form = change
        out.append(f"note: depth {old} -> {depth}: model.schedule.{form} on the command line "
                   f"replaces the recipe's {base_form}, and without model.n_layers the "
                   f"{form}'s length sets the depth (add model.n_layers={old} to keep "
                   f"{old})")
    adj = adjacent_minority(recipe)
    if adj:
        name, i = adj
        out.append(f"note: placement even puts '{name}' at entries {i} and {i + 1}, side by "
                   "side, as Megatron-LM's allocator does; model.schedule.placement=period "
                   "repeats a unit instead (majority first)")
    return out


def adjacent_minority(recipe) -> tuple[str, int] | None:
    """(name, first index) of two adjacent entries of a minority type of an ``even`` ratio."""
    s = recipe.model.schedule
    if s.ratio is None or s.placement != "even" or not s.blocks:
        return None
    parts = [int(p) for p in s.ratio.split(":")]
    major = s.blocks[max(range(len(parts)), key=lambda i: (parts[i], -i))]
    names = recipe.schedule.names
    for i in range(len(names) - 1):
        if names[i] == names[i + 1] != major and names[i] in s.blocks:
            return names[i], i
    return None
