"""``train.logger``: the metrics rows of a run sent to TensorBoard and Weights & Biases too.

``metrics.jsonl`` stays the record; these sinks show the same rows in their own viewers. Both
write into the run folder and never touch the network:

* ``tensorboard``: event files directly in the run folder (``tensorboard --logdir RUN``, or
  ``--logdir runs/`` for every run), the recipe as text (tag ``config``) and as hyperparameters
  (the HPARAMS tab: one session per run folder, the recipe flattened to dotted keys).
* ``wandb``: an offline run in ``RUN/wandb/offline-run-*`` holding the recipe as its config;
  ``wandb sync RUN/wandb/offline-run-*`` uploads it later. Each :class:`MetricSinks` is its own
  W&B run, so the runs of a Hydra sweep in one process stay apart; the project is
  ``$WANDB_PROJECT``, else ``hycomp``.

A row's scalars are named by group (:func:`scalar_tags`). A resumed session writes new event
files beside the earlier ones and passes the step it continues from: TensorBoard then hides what
the earlier session wrote after that step, as ``metrics.jsonl`` drops those rows (W&B gets a
new offline run for the new session).
"""
from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import re
from pathlib import Path

from composer.core.errors import HycompError
from composer.run.control import say

# sink name -> (modules it imports, pip package)
_PACKAGES = {"tensorboard": (("tensorboard", "torch.utils.tensorboard"), "tensorboard"),
             "wandb": (("wandb",), "wandb")}
_WANDB_MIN = (0, 19, 10)  # reinit="create_new": several runs in one process

# metrics.jsonl key -> scalar name; any other key is misc/<key>
_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
         "tokens_per_s": "train/tokens_per_s",
         "val_loss": "val/loss", "val_bpb": "val/bpb", "val_acc": "val/acc"}


def scalar_tags(row: dict) -> dict[str, float]:
    """The scalars of one ``metrics.jsonl`` row, by name, ``step`` left out.

    ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s`` (train rows) -> ``train/<key>``;
    ``val_loss``, ``val_bpb``, ``val_acc`` -> ``val/loss``, ``val/bpb``, ``val/acc``; any other
    key (``tokens``, ``elapsed``, ``skipped_steps``, ``unigram_bpb``, ``params``, ...) ->
    ``misc/<key>``. Values that are None, NaN, infinite, booleans or not numbers are left out.
    """
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if math.isfinite(value):
            out[_TAGS.get(key, f"misc/{key}")] = float(value)
    return out


def _flat(d, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become their JSON text."""
    if isinstance(d, dict):
        return {k: v for key, sub in d.items()
                for k, v in _flat(sub, f"{prefix}.{key}" if prefix else str(key)).items()}
    if isinstance(d, (list, tuple)):
        return {prefix: json.dumps(d)}
    return {prefix: d}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def check_sinks(names: list[str]) -> None:
    """Raise :class:`HycompError` when a sink named in ``train.logger`` cannot be imported
    (or ``wandb`` is older than 0.19.10); the fix is its pip command."""
    missing = []  # (name, pip requirement, why)
    for name in names:
        modules, package = _PACKAGES[name]
        try:
            loaded = [importlib.import_module(m) for m in modules]
        except ImportError as e:
            missing.append((name, package, f"import {e.name or package} failed: {e}"))
            continue
        version = getattr(loaded[0], "__version__", "0")
        if name == "wandb" and _version(version) < _WANDB_MIN:
            missing.append((name, '"wandb>=0.19.10"', f"wandb {version} is installed; several "
                                                      f"runs in one process need 0.19.10"))
    if missing:
        value = names[0] if len(names) == 1 else f"[{','.join(names)}]"
        raise HycompError(
            what=f"train.logger names {', '.join(m[0] for m in missing)}, which cannot be used "
                 f"here",
            where=f"train.logger={value}", why="; ".join(m[2] for m in missing),
            fix=f"pip install {' '.join(m[1] for m in missing)} (or, in a clone of hycomp, "
                f"pip install -e \".[{','.join(m[0] for m in missing)}]\"), or drop "
                f"{' and '.join(m[0] for m in missing)} from train.logger")


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict, run_name: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: TensorBoard hides events of earlier sessions at steps >= it (its default
        # fast loader also drops, per tag, the points at and after a step that is logged again)
        self.writer = SummaryWriter(log_dir=str(run_dir), flush_secs=10,
                                    purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=1)}\n```")
        # the session start alone: TensorBoard gathers an experiment from the sessions of all
        # run folders (an experiment summary of its own would hide the others' keys)
        _, session_start, _ = hparams({k: v for k, v in _flat(config).items()
                                       if isinstance(v, (int, float, str))}, {})
        self.writer.file_writer.add_summary(session_start)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict, run_name: str, start_step: int):
        import wandb

        self.run = wandb.init(
            mode="offline", dir=str(run_dir), name=run_name, config=config,
            project=os.environ.get("WANDB_PROJECT", "hycomp"), reinit="create_new",
            # no console capture (the trainer owns stdout/stderr and the bar), no banners
            settings=wandb.Settings(console="off", silent=True))
        say(f"wandb: offline run in {self.run.settings.sync_dir} (upload: wandb sync "
            f"{self.run.settings.sync_dir})")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


_SINKS = {"tensorboard": _TensorBoard, "wandb": _WandB}


class MetricSinks:
    """The sinks of ``train.logger`` for one training session in ``run_dir``.

    ``names``: from {"tensorboard", "wandb"}; ``config``: the recipe as plain JSON data;
    ``run_name``: the W&B run's name; ``start_step``: the step a resumed session continues
    from (0 for a new run). A sink's package missing raises :class:`HycompError`
    (:func:`check_sinks`); any other failure of a sink, opening or later, is one warning and
    the sink is dropped: the run goes on, and ``metrics.jsonl`` has every row.
    """

    def __init__(self, names: list[str], run_dir: Path, config: dict, run_name: str,
                 start_step: int = 0):
        check_sinks(names)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._sinks = {}
        for name in dict.fromkeys(names):
            try:
                self._sinks[name] = _SINKS[name](Path(run_dir), config, run_name, start_step)
            except Exception as e:  # noqa: BLE001 - a viewer must not stop the training
                self._drop(name, "cannot start", e)

    def _drop(self, name: str, doing: str, e: Exception) -> None:
        say(f"warning: train.logger {name} {doing} ({type(e).__name__}: {e}); the run goes "
            f"on without it (metrics.jsonl has every row)", warn=True)
        sink = self._sinks.pop(name, None)
        if sink is not None:
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - already failing; its warning is out
                pass

    def log(self, row: dict) -> None:
        """Send the scalars of one ``metrics.jsonl`` row (:func:`scalar_tags`) at
        ``row["step"]``."""
        scalars = scalar_tags(row)
        if not scalars:
            return
        for name, sink in list(self._sinks.items()):
            try:
                sink.log(int(row["step"]), scalars)
            except Exception as e:  # noqa: BLE001 - a viewer must not stop the training
                self._drop(name, "failed", e)

    def close(self) -> None:
        """Flush and close every sink; a second call does nothing."""
        while self._sinks:
            name, sink = self._sinks.popitem()
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - the run's own records are written
                say(f"warning: train.logger {name} failed to close ({type(e).__name__}: {e})",
                    warn=True)
