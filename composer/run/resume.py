"""Continuing a run: which folder and checkpoint, and which recipe.

A resumed run keeps the recipe its checkpoint was written with (``recipe.json``); the command
line need not repeat the overrides the run was started with. :func:`recipe_for_resume` builds
the recipe of ``hycomp train train.resume=RUN``: the checkpoint's ``model``, ``data``, ``train``
and ``kernels`` sections, with the settings the user names on the command line. Those are
compared or applied: an explicit ``model.*`` / ``data.*`` override (or a ``model=`` / ``data=``
group choice) whose value differs from the run's is an error naming it; explicit ``train.*``
overrides apply (e.g. more steps), and so do ``kernels.*`` ones (a backend changes how, not
what, is computed). :func:`check_resumable` is the last check, on the
recipe a resume actually trains.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from composer.core.errors import CheckpointError
from composer.run.checkpoint import CKPT_DIR, latest_checkpoint, read_recipe

_MISSING = object()
_SECTIONS = ("model", "data")


def flatten(d, prefix: str = "") -> dict:
    """Nested dicts -> ``{"a.b.c": leaf}`` (keys under ``prefix``); an empty dict has no
    leaves."""
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, sub in d.items()
            for k, v in flatten(sub, f"{prefix}.{key}" if prefix else str(key)).items()}


def check_resumable(recipe, saved: dict, ckpt: Path) -> None:
    """Raise :class:`CheckpointError` listing the keys where the ``model`` or ``data`` section
    of ``recipe`` differs from the recipe the checkpoint was written with."""
    now = json.loads(json.dumps(recipe.model_dump(mode="json")))
    diffs = []
    for section in _SECTIONS:
        old, new = flatten(saved.get(section), section), flatten(now[section], section)
        diffs += [f"{k}: {old.get(k, '(absent)')!r} in the run, {new.get(k, '(absent)')!r} now"
                  for k in sorted(set(old) | set(new)) if old.get(k, ...) != new.get(k, ...)]
    if diffs:
        more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
        raise CheckpointError(
            what="the recipe's model/data sections differ from the run being resumed",
            where=str(ckpt), why="; ".join(diffs[:8]) + more,
            fix="drop the overrides that change model.* or data.* (train.* may change, e.g. "
                "a larger train.steps), or start a new run without train.resume")


def run_folder(recipe, run_dir) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume or None): ``train.resume``'s folder and its latest
    checkpoint, which must fit the recipe; otherwise ``run_dir``, which must hold none."""
    if recipe.train.resume:
        run_dir = Path(recipe.train.resume)
        ckpt = latest_checkpoint(run_dir)
        check_resumable(recipe, read_recipe(ckpt), ckpt)
        return run_dir, ckpt
    run_dir = Path(run_dir)
    if any((run_dir / CKPT_DIR).glob("step_*")):
        raise CheckpointError(what="the run folder already holds checkpoints",
                              where=str(run_dir), why="a new run would mix with them",
                              fix=f"continue it with train.resume={run_dir}, or train "
                                  "into a new folder")
    return run_dir, None


def override_keys(overrides: list[str]) -> list[str]:
    """The keys (or group names) that command-line overrides set: ``+a.b=1`` -> ``a.b``,
    ``~a.b`` -> ``a.b``, ``model=x`` -> ``model``."""
    keys = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~").split("@", 1)[0].strip()
        if key and key not in keys:
            keys.append(key)
    return keys


def lookup(d: Any, dotted: str, missing: Any = _MISSING) -> Any:
    """``d[a][b]...`` at ``a.b...``, or ``missing`` when a part is not there."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return missing
        d = d[part]
    return d


def _show(v: Any) -> str:
    return "(absent)" if v is _MISSING else json.dumps(v)


def recipe_for_resume(composed: dict, recipe, overrides: list[str]) -> dict:
    """The recipe (a plain dict, to validate) that ``train.resume`` trains: the recipe of the
    run's latest checkpoint, with the explicit ``train.*`` / ``kernels.*`` settings of
    ``recipe`` (``composed``, the command line's config, validated) applied; ``overrides``: the
    command line's.
    Raises :class:`CheckpointError` naming each explicit model/data override that differs from
    the run."""
    ckpt = latest_checkpoint(Path(recipe.train.resume))
    saved = read_recipe(ckpt)
    now = json.loads(json.dumps(recipe.model_dump(mode="json")))
    keys = override_keys(overrides)
    conflicts = [f"{k}={_show(lookup(now, k))} now, {_show(lookup(saved, k))} in the run"
                 for k in keys if k.split(".", 1)[0] in _SECTIONS
                 and lookup(now, k) != lookup(saved, k)]
    if conflicts:
        raise CheckpointError(
            what="an override changes the model or data of the run being resumed",
            where=f"train.resume={recipe.train.resume} ({ckpt.name})",
            why="; ".join(conflicts),
            fix="drop those overrides: a resumed run keeps its checkpoint's model and data "
                "(train.* may change, e.g. a larger train.steps); or start a new run without "
                "train.resume")
    out = {**composed, "model": saved["model"], "data": saved["data"],
           "train": json.loads(json.dumps(saved.get("train") or {})),
           "kernels": dict(saved.get("kernels") or {})}
    for k in keys:
        if k.split(".", 1)[0] in ("train", "kernels"):
            _put(out, k, lookup(now, k))
    return out


def _put(d: dict, dotted: str, value: Any) -> None:
    """Set ``d[a][b]...`` at ``a.b...`` (``_MISSING``: delete it)."""
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    if value is _MISSING:
        d.pop(last, None)
    else:
        d[last] = value
