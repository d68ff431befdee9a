"""``hycomp train`` as a Hydra app: run folders, ``-m`` sweeps, ``--cfg``, the .hydra/ record.

The CLI has already validated every job of the command line and added the overrides of the
schedule-form rule (``composer.compose.full_overrides``); each job validates its composed config
again and trains it. Errors print what / where / why / fix and exit with the error's code (2;
3 for a diverged run); a ``SystemExit`` passes through Hydra's error handling.

Run folders: ``recipes/config.yaml`` names them ``${unique_dir:runs/<date>/<time>}``; the
:func:`claim_run_dir` resolver creates the folder with ``mkdir`` (no ``exist_ok``) and, when it
is taken, the next free ``<time>-1``, ``<time>-2`` ...: runs (and sweeps) started in the same
second get folders of their own. Hydra resolves it once per run (its resolver cache), before it
writes ``.hydra/`` there. A run folder named explicitly (``hydra.run.dir=``) is checked by
:func:`check_run_dirs` before Hydra starts, and the trainer's lock refuses a folder another live
run trains in.

A resumed run trains the model, data and kernels of its checkpoint
(:func:`composer.run.resume.recipe_for_resume`); only what the command line names is compared.
A job that fails before training leaves no folder behind (:func:`_discard_unused`); one that
stops later writes summary.json with its status.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from composer.core.errors import HycompError

# What Hydra writes into a run folder before the job starts (and the trainer's lock).
_HYDRA_ONLY = {".hydra", "train.log", ".lock"}


def claim_run_dir(path: str) -> str:
    """Create and return the folder ``path``, or ``path-1``, ``path-2`` ... when it exists."""
    base = Path(path)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for i in range(100000):
            cand = base if i == 0 else base.with_name(f"{base.name}-{i}")
            try:
                os.mkdir(cand)
            except FileExistsError:
                continue
            return str(cand)
    except OSError as e:
        raise _dir_error(path, "hydra.run.dir", e) from None
    raise HycompError(what=f"no free run folder name {path}-N", where="hydra.run.dir",
                      fix="clean up runs/")


OmegaConf.register_new_resolver("unique_dir", claim_run_dir, use_cache=True, replace=True)

# Longest sweep job folder name; a longer one is cut and ends with a hash of the whole.
MAX_JOB_DIR = 96


def unescape(text: str | None) -> str:
    """Hydra's ``override_dirname`` without the backslashes it puts before ``:`` and the
    other characters of its grammar (``ratio=3\\:1`` -> ``ratio=3:1``)."""
    return re.sub(r"\\(.)", r"\1", str(text or ""))


def _dirname_items(text: str) -> list[tuple[str, str]]:
    """``override_dirname`` (``k1=v1,k2=v2``, with Hydra's escapes) -> [(key, value)]."""
    items = []
    for part in re.split(r"(?<!\\),", str(text or "")):
        key, _, value = part.partition("=")
        if key:
            items.append((key.lstrip("+~"), unescape(value)))
    return items


def job_dir(num: Any, overrides: str | None) -> str:
    """A sweep job's folder name: ``<job number>_<key>-<value>_...`` from its swept
    overrides (Hydra's ``override_dirname``, which the CLI restricts to the swept keys).
    A key is its last dotted part (``model.schedule.pattern`` -> ``pattern``) unless two
    swept keys end alike; characters that would need quoting in an override (``train.resume=``
    takes the folder) or in a shell become '_'. Past :data:`MAX_JOB_DIR` characters the name
    is cut and ends with 8 hex digits of the full name's sha1. The number keeps names unique
    and sorted: ``3_pattern-MMM*_lr-0.003``."""
    items = _dirname_items(overrides)
    lasts = [k.rsplit(".", 1)[-1] for k, _ in items]
    parts = [f"{last if lasts.count(last) == 1 else key}-{value}"
             for (key, value), last in zip(items, lasts)]
    text = re.sub(r"[^A-Za-z0-9._:*@%+-]+", "_", "_".join(parts)).strip("_")
    name = f"{num}_{text}" if text else str(num)
    if len(name) > MAX_JOB_DIR:
        name = name[:MAX_JOB_DIR - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


OmegaConf.register_new_resolver("job_dir", job_dir, replace=True)


def _dir_error(path: str, key: str, e: OSError) -> HycompError:
    return HycompError(what=f"cannot create the run folder {path}", where=f"{key}={path}",
                       why=f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
                       fix=f"give {key} a folder you can write to (not under a file, not in "
                           "/proc or /sys), or leave it at its default (runs/<date>/<time>)")


def check_run_dirs(overrides: list[str], multirun: bool) -> None:
    """Create the run folder (``hydra.run.dir``; ``hydra.sweep.dir`` with ``-m``) named on the
    command line, or raise :class:`HycompError` saying why it cannot be created."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key]
    if not values or "${" in values[-1]:
        return
    try:
        Path(values[-1]).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _dir_error(values[-1], key, e) from None


def _discard_unused(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but Hydra's record: its job never trained."""
    try:
        names = set(os.listdir(run_dir))
    except OSError:
        return
    if names <= _HYDRA_ONLY:
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(config_path="pkg://recipes", config_name="config", version_base=None)
def hydra_train(cfg: DictConfig) -> float | None:
    from composer.recipe.validate import validate_recipe
    from composer.run.resume import recipe_for_resume
    from composer.run.train import run
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
        recipe = validate_recipe(data)
        overrides = list(hc.overrides.task)
        if recipe.train.resume:
            recipe = validate_recipe(recipe_for_resume(data, recipe, overrides))
        swept = (_dirname_items(hc.job.override_dirname)
                 if hc.mode.name == "MULTIRUN" else [])
        label = ", ".join(f"{k}={v}" for k, v in swept) or run_dir.name
        summary = run(recipe, run_dir, overrides=overrides, label=label)
    except HycompError as e:
        _discard_unused(run_dir)
        print(e.render(), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is in the run folder; resume with "
              "train.resume=<run folder>", file=sys.stderr)
        sys.exit(130)
    return summary.get("val_loss")
