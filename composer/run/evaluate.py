"""``hycomp eval``: score a trained checkpoint on its own data or on synthetic tasks, at any length.

What is scored (each an :class:`EvalItem`):

* the run's own data (the default): text — mean loss over ``batches`` fixed validation windows
  and bits per byte; a task — loss and accuracy over its whole fixed test set;
* ``tasks``: each named synthetic task with the run's settings when the run trained on that
  task, else the task's defaults; ``settings`` (``num_pairs=16`` or ``data.num_pairs=16``)
  change them; ``text`` names the byte data (the run's own, or the standard library's);
* ``seq_lens``: every item at each of these lengths (length extrapolation: train at 256, test
  at 512 and 1024); default the item's own ``seq_len``.

Results go to ``eval.json`` in the run folder (``{"step", "checkpoint", "results": [...]}``;
an item evaluated again replaces its old result, others are kept) and are returned.

Every bad input raises :class:`~composer.core.errors.HycompError` before anything is computed:
an unknown task, a setting the task does not have or cannot use (more pairs than fit), a task
whose tokens do not fit the model's vocabulary, a length past ``model.max_seq_len``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from composer.core.errors import HycompError
from composer.recipe.problems import pydantic_problems
from composer.recipe.schema import DataConfig
from composer.recipe.tasks import TASKS
from composer.run.checkpoint import CKPT_DIR, write_text_atomic
from composer.run.generate import find_checkpoint, load_model
from composer.run.guards import json_safe
from composer.run.runtime import pick_device
from composer.run.sources import evaluate, open_source

EVAL_FILE = "eval.json"


def _result_key(task: str, seq_len: int, settings: dict | None) -> tuple:
    """Identity of a result in eval.json: the task, its length and its other settings."""
    return (task, seq_len, json.dumps(settings, sort_keys=True))


@dataclass
class EvalItem:
    """One thing to score: a data section (text or task settings) at one length."""
    data: Any
    seq_len: int

    @property
    def task(self) -> str:
        return self.data.task

    def key(self) -> tuple:
        return _result_key(self.task, self.seq_len, self.settings())

    def settings(self) -> dict:
        return {k: v for k, v in self.data.model_dump(mode="json").items()
                if k not in ("task", "seq_len")}


def _where(task: str, key: str) -> str:
    return f"--task {task}, setting {key}"


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings (``data.`` prefix optional) -> a dict; values read as YAML
    scalars (``16`` is an int, ``null`` None, ``0.5`` a float)."""
    import yaml
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().removeprefix("data.")
        if not sep or not key:
            raise HycompError(what=f"bad task setting {pair!r}", where=pair,
                              why="a setting is key=value",
                              fix="write e.g. num_pairs=16 (or data.num_pairs=16)")
        try:
            out[key] = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            out[key] = value
    return out


def _task_data(task: str, recipe, settings: dict) -> Any:
    """The data section of ``task``: the run's own when it trained on that task (``text``:
    the run's text, or the default byte data), else the task's defaults; then ``settings``."""
    if task == "text":
        base = (recipe.data.model_dump() if recipe.data.task == "text"
                else DataConfig().model_dump())
        cls = DataConfig
    elif task in TASKS:
        cls = TASKS[task]
        base = recipe.data.model_dump() if recipe.data.task == task else {"task": task}
    else:
        from composer.core.registry import did_you_mean
        names = ["text", *TASKS]
        raise HycompError(what=f"unknown task '{task}'", where=f"--task {task}",
                          why=f"tasks: {', '.join(names)}",
                          fix="use one of those" + did_you_mean(task, names))
    merged = {**base, **settings}
    try:
        data = cls.model_validate(merged)
    except ValidationError as err:
        raise HycompError(what=f"bad settings for task '{task}'", where=f"--task {task}",
                          problems=pydantic_problems(err, prefix=("data",))) from None
    return data


def _at_length(task: str, data: Any, T: int) -> Any:
    """``data`` at ``T`` tokens, validated again (a task may need a longer sequence)."""
    if T == data.seq_len:
        return data
    try:
        return type(data).model_validate({**data.model_dump(), "seq_len": T})
    except ValidationError as err:
        raise HycompError(what=f"bad length {T} for task '{task}'", where=f"--seq-len {T}",
                          problems=pydantic_problems(err, prefix=("data",))) from None


def _check_item(item: EvalItem, recipe) -> None:
    data, T, model = item.data, item.seq_len, recipe.model
    if T > model.max_seq_len:
        raise HycompError(what=f"length {T} is past the model's positions",
                          where=f"--seq-len {T} (task {item.task})",
                          why=f"the model was built for at most model.max_seq_len="
                              f"{model.max_seq_len} positions (its position tables end there)",
                          fix=f"use lengths up to {model.max_seq_len}")
    if item.task == "text":
        if model.vocab_size < 256:
            raise HycompError(what="the model's vocabulary cannot hold bytes",
                              where=f"--task text, model.vocab_size={model.vocab_size}",
                              why="text is read as bytes: token ids 0..255",
                              fix="evaluate this run on its own task (no --task)")
        return
    probs = data.problems()
    if probs:
        what, key, why, fix = probs[0]
        raise HycompError(what=f"task {item.task} cannot make sequences at these settings: "
                               f"{what}", where=_where(item.task, key) + f", seq_len={T}",
                          why=why, fix=fix)
    need = data.vocab_needed()
    if need > model.vocab_size:
        raise HycompError(what=f"task {item.task} needs a vocabulary of {need} tokens",
                          where=f"--task {item.task}, model.vocab_size={model.vocab_size}",
                          why=f"the task emits token ids up to {need - 1}; this model's "
                              f"embedding holds {model.vocab_size}",
                          fix=f"lower its vocabulary: --task {item.task} "
                              f"vocab_size={model.vocab_size} (if the task allows it)")


def plan(recipe, tasks: list[str] | None, seq_lens: list[int] | None,
         settings: dict[str, Any]) -> list[EvalItem]:
    """The items to score, each checked (module docstring); raises before any computation."""
    items = []
    for task in tasks or [recipe.data.task]:
        data = _task_data(task, recipe, settings)
        for T in seq_lens or [data.seq_len]:
            if T < 1:
                raise HycompError(what=f"bad length {T}", where=f"--seq-len {T}",
                                  why="a length is a positive number of tokens",
                                  fix="give lengths such as --seq-len 256,512")
            item = EvalItem(_at_length(task, data, T), T)
            _check_item(item, recipe)
            items.append(item)
    return items


def run_folder_of(ckpt: Path) -> Path:
    """Where eval.json goes: the run folder of a checkpoint inside one
    (RUN/checkpoints/step_N), else the checkpoint folder itself."""
    return ckpt.parent.parent if ckpt.parent.name == CKPT_DIR else ckpt


def evaluate_run(path, tasks: list[str] | None = None, seq_lens: list[int] | None = None,
                 settings: dict[str, Any] | None = None, batches: int | None = None,
                 batch_size: int | None = None, device: str = "auto",
                 progress: bool = False, write: bool = True) -> dict:
    """Score the checkpoint at ``path`` (a run or checkpoint folder) on each planned item
    (module docstring); write eval.json (when ``write``) and return its content."""
    from tqdm import tqdm

    ckpt = find_checkpoint(path)
    dev = pick_device(device)
    model, recipe = load_model(ckpt, dev)
    items = plan(recipe, tasks, seq_lens, settings or {})
    n_batches = batches or recipe.train.eval_batches
    bs = batch_size or recipe.train.batch_size
    step = _step_of(ckpt)
    results = []
    for item in tqdm(items, disable=not progress or len(items) < 2, unit="item", leave=False):
        t = time.perf_counter()
        source = open_source(item.data, train=False)
        scores = evaluate(model, source.eval_batches(n_batches, bs), dev, recipe.train.dtype,
                          accuracy=source.is_task)
        row = {"task": item.task, "seq_len": item.seq_len, "loss": scores.loss,
               "accuracy": scores.accuracy, "bpb": None if source.is_task else scores.bpb,
               "n": scores.tokens, "trained_seq_len": recipe.data.seq_len,
               "settings": item.settings(), "seconds": time.perf_counter() - t}
        results.append(row)
    out = {"step": step, "checkpoint": str(ckpt), "results": results}
    if write:
        out = _merge(run_folder_of(ckpt) / EVAL_FILE, out, items)
    return out


def _step_of(ckpt: Path) -> int | None:
    trainer = ckpt / "trainer.json"
    try:
        return int(json.loads(trainer.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _merge(path: Path, new: dict, items: list[EvalItem]) -> dict:
    """``new`` plus the results of ``path`` (same checkpoint) that no new item replaces."""
    keys = {item.key() for item in items}
    kept = []
    try:
        old = json.loads(path.read_text())
        if old.get("checkpoint") == new["checkpoint"]:
            kept = [r for r in old.get("results", []) if _result_key(
                r.get("task"), r.get("seq_len"), r.get("settings")) not in keys]
    except (OSError, ValueError, AttributeError):
        pass
    merged = {**new, "results": kept + new["results"]}
    write_text_atomic(path, json.dumps(json_safe(merged), indent=1, allow_nan=False) + "\n")
    return merged


def format_table(out: dict) -> str:
    """The results as an aligned text table."""
    rows = [("task", "length", "loss", "accuracy", "bits/byte", "scored tokens")]
    for r in out["results"]:
        rows.append((r["task"], str(r["seq_len"]), f"{r['loss']:.4f}",
                     "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%",
                     "-" if r["bpb"] is None else f"{r['bpb']:.4f}", f"{r['n']:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines)
