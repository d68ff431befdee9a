"""Checkpoints of a run folder, in safetensors and JSON only (no pickle anywhere).

Layout::

    <run>/checkpoints/step_000200/
        model.safetensors   model.state_dict(); a tensor aliased under several names (tied or
                            shared weights) is stored once, the aliases listed in its metadata
        optim.safetensors   optimizer state as ``state.<param index>.<key>`` (exp_avg, ...),
                            RNG states as ``rng.<name>``; metadata ``optim``: JSON of the
                            param groups and the non-tensor state values
        trainer.json        step and loop counters (given by the trainer), sha256 of both
                            .safetensors files
        recipe.json         the resolved recipe (``recipe.model_dump(mode="json")``)
    <run>/checkpoints/latest    "step_000200": the newest complete checkpoint

A checkpoint is written into a temporary folder ``checkpoints/.tmp-*`` and renamed into place,
then ``latest`` is replaced (write to a temporary file, ``os.replace``): a crash at any moment
leaves the previous checkpoint and ``latest`` intact, and a leftover ``.tmp-*`` folder is never
read. Older checkpoints are deleted (``keep``) only after the new one and ``latest`` are in
place, and a model or optimizer state holding NaN or infinity is refused
(:class:`CheckpointError`), so a diverged run never replaces good checkpoints. Temporary folders
and files, and the .safetensors files, get the modes ``mkdir`` / ``open`` give (0777 / 0666 less
the umask), like every other file of the run, not the private 0700 / 0600 of ``tempfile`` and
``safetensors``. Every loading
problem raises :class:`CheckpointError` (what / where / why / fix).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from composer.core.errors import CheckpointError

CKPT_DIR = "checkpoints"
FILES = ("model.safetensors", "optim.safetensors", "trainer.json", "recipe.json")


class NonFiniteCheckpointError(CheckpointError):
    """:func:`save_checkpoint` refused a model or optimizer state holding NaN or infinity."""


_FIX_NEW = "start a new run (train.resume=null), or resume from another run folder"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def _step_of(name: str) -> int | None:
    head, _, num = name.partition("_")
    return int(num) if head == "step" and num.isdigit() else None


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def _canonical(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without aliases: tensors sharing memory (same storage, offset, shape and
    strides) are kept under their first name; returns (tensors, alias -> kept name)."""
    kept: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in sd.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               t.stride())
        if t.numel() and key in kept:
            aliases[name] = kept[key]
        else:
            kept[key] = name
            out[name] = t.detach().to("cpu").contiguous()
    return out, aliases


def _optim_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, extra = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                extra[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "state_extra": extra}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _temp(parent: Path, prefix: str, folder: bool) -> tuple[Path, int | None]:
    """Create a new, uniquely named folder (returns ``(path, None)``) or file opened for writing
    (``(path, fd)``) in ``parent``. Unlike ``tempfile``'s 0700 / 0600, the modes are those of
    ``mkdir`` / ``open`` (0777 / 0666 less the umask): what is renamed into place looks like
    every other file of the run folder."""
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        try:
            if folder:
                os.mkdir(path)
                return path, None
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name {prefix}* in {parent}")


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """safetensors' ``save_file`` (it writes a private 0600 file), then the mode ``open`` would
    have given (0666 less the umask)."""
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so a reader sees the old or the new content, never half."""
    path = Path(path)
    tmp, fd = _temp(path.parent, f".tmp-{path.name}-", folder=False)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [n for n, t in tensors.items()
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, trainer: dict, recipe: dict,
                    rng: dict[str, torch.Tensor], keep: int | None = None) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>/`` atomically, point ``latest`` at it, then
    delete all but the newest ``keep`` checkpoints (None: keep all). Returns its folder."""
    ckpts = Path(run_dir) / CKPT_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / step_name(step)
    tensors, aliases = _canonical(model.state_dict())
    opt_tensors, opt_meta = _optim_tensors(optimizer)
    bad = nonfinite_tensors(tensors) + [f"optimizer {n}" for n in nonfinite_tensors(opt_tensors)]
    if bad:
        more = f" (and {len(bad) - 4} more)" if len(bad) > 4 else ""
        raise NonFiniteCheckpointError(what="refusing to checkpoint non-finite weights",
                              where=str(final), why="NaN or infinity in " + ", ".join(bad[:4])
                              + more, fix="lower train.lr (or resume from the last good "
                                          "checkpoint); the earlier checkpoints are kept")
    for left in ckpts.glob(".tmp-*"):  # from a session that was killed while writing
        if left.is_dir():
            shutil.rmtree(left, ignore_errors=True)
        else:
            left.unlink(missing_ok=True)
    tmp, _ = _temp(ckpts, f".tmp-{final.name}-", folder=True)
    try:
        _save_tensors(tensors, tmp / "model.safetensors", {"aliases": json.dumps(aliases)})
        opt_tensors.update({f"rng.{k}": v.to("cpu").contiguous() for k, v in rng.items()})
        _save_tensors(opt_tensors, tmp / "optim.safetensors", {"optim": json.dumps(opt_meta)})
        sums = {n: _sha256(tmp / n) for n in ("model.safetensors", "optim.safetensors")}
        _write_json(tmp / "trainer.json", {**trainer, "step": step, "sha256": sums})
        _write_json(tmp / "recipe.json", recipe)
        if final.exists():  # saving the same step again (e.g. interrupted right after resume)
            old, _ = _temp(ckpts, f".tmp-old-{final.name}-", folder=True)
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(ckpts / "latest", final.name + "\n")
    if keep is not None:
        steps = sorted((s, p) for p in ckpts.iterdir() if (s := _step_of(p.name)) is not None)
        for _, p in steps[:-keep]:
            if p != final:
                _discard(p)
    return final


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder: first renamed to ``.tmp-del-*`` (atomic), so a crash while
    deleting never leaves a half-deleted ``step_*`` folder that looks like a checkpoint."""
    trash = folder.with_name(f".tmp-del-{folder.name}-{secrets.token_hex(4)}")
    try:
        os.replace(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path:
    """The folder of the newest complete checkpoint of a run folder (``checkpoints/latest``;
    without it, the highest ``step_*`` folder)."""
    run_dir = Path(run_dir)
    where = f"train.resume={run_dir}"
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(what=f"train.resume names a file, not a run folder: {run_dir}",
                              where=where, why="a run folder holds checkpoints/, metrics.jsonl "
                                               "and the rest of a run",
                              fix="give the run folder (e.g. runs/<date>/<time>), not a file "
                                  "inside it, or " + _FIX_NEW)
    if not run_dir.is_dir():
        raise CheckpointError(what=f"run folder not found: {run_dir}", where=where,
                              why="there is no folder there",
                              fix="give a run folder written by `hycomp train` (it holds "
                                  "checkpoints/), or " + _FIX_NEW)
    ckpts = run_dir / CKPT_DIR
    latest = ckpts / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if _step_of(name) is None or not (ckpts / name).is_dir():
            raise CheckpointError(what="checkpoints/latest points at no checkpoint",
                                  where=str(latest), why=f"it reads {name!r}",
                                  fix="write the name of a step_* folder into it, delete it "
                                      "to use the newest step_* folder, or " + _FIX_NEW)
        return ckpts / name
    found = sorted((s, p) for p in (ckpts.iterdir() if ckpts.is_dir() else ())
                   if (s := _step_of(p.name)) is not None and p.is_dir())
    if not found:
        raise CheckpointError(what="no checkpoint in the run folder", where=where,
                              why=f"{ckpts} holds no step_* checkpoint",
                              fix="resume a run that wrote a checkpoint, or " + _FIX_NEW)
    return found[-1][1]


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(what="checkpoint file is damaged", where=str(path), why=why,
                           fix="resume from an earlier checkpoint (write its step_* name into "
                               "checkpoints/latest), or " + _FIX_NEW)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None


def _require_files(ckpt: Path) -> None:
    if not ckpt.is_dir():
        raise CheckpointError(what=f"checkpoint folder not found: {ckpt}", where=str(ckpt),
                              why="there is no folder there", fix=_FIX_NEW)
    missing = [n for n in FILES if not (ckpt / n).is_file()]
    if missing:
        raise CheckpointError(what="checkpoint is incomplete", where=str(ckpt),
                              why="missing " + ", ".join(missing),
                              fix="resume from an earlier checkpoint, or " + _FIX_NEW)


def read_recipe(ckpt: Path) -> dict:
    """The recipe (``model_dump(mode="json")``) a checkpoint was written with."""
    ckpt = Path(ckpt)
    _require_files(ckpt)
    return _read_json(ckpt / "recipe.json")


def _mismatch(ckpt: Path, what: str, lines: list[str]) -> CheckpointError:
    more = f" (and {len(lines) - 8} more)" if len(lines) > 8 else ""
    return CheckpointError(what=f"checkpoint does not fit the {what}", where=str(ckpt),
                           why="; ".join(lines[:8]) + more,
                           fix="resume with the recipe the run was started with (drop the "
                               "overrides that change model.*), or " + _FIX_NEW)


def _load_model(ckpt: Path, model: torch.nn.Module) -> None:
    tensors, _ = _read_safetensors(ckpt / "model.safetensors")
    want, aliases = _canonical(model.state_dict())
    lines = [f"missing {n}" for n in want if n not in tensors]
    lines += [f"unexpected {n}" for n in tensors if n not in want]
    lines += [f"{n}: shape {tuple(tensors[n].shape)} in the checkpoint, "
              f"{tuple(t.shape)} in the model" for n, t in want.items()
              if n in tensors and tensors[n].shape != t.shape]
    if lines:
        raise _mismatch(ckpt, "model", lines)
    model.load_state_dict({**tensors, **{a: tensors[n] for a, n in aliases.items()}})


def _load_optim(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors, meta = _read_safetensors(ckpt / "optim.safetensors")
    try:
        saved = json.loads(meta["optim"])
        groups = [g["params"] for g in saved["param_groups"]]
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt(ckpt / "optim.safetensors", f"bad metadata: {e!r}") from None
    current = optimizer.state_dict()["param_groups"]
    if groups != [g["params"] for g in current]:
        sizes = [len(g["params"]) for g in current]
        raise _mismatch(ckpt, "optimizer", [f"parameter groups of sizes {[len(g) for g in groups]}"
                                            f" in the checkpoint, {sizes} now"])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    for k, v in saved["state_extra"].items():
        idx, key = k.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    bad = [f"state of parameter {i}: {k} has shape {tuple(v.shape)}, the parameter "
           f"{tuple(params[i].shape)}" for i, st in state.items() for k, v in st.items()
           if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != params[i].shape]
    if bad:
        raise _mismatch(ckpt, "optimizer", bad)
    # hyperparameters (lr, betas, weight decay) stay those of the current recipe
    optimizer.load_state_dict({"state": state, "param_groups": current})
    return {name[4:]: t for name, t in tensors.items() if name.startswith("rng.")}


def load_checkpoint(ckpt: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint folder into ``model`` (and ``optimizer``). Returns ``{"trainer":
    trainer.json, "rng": {name: state tensor}, "recipe": recipe.json}``."""
    ckpt = Path(ckpt)
    _require_files(ckpt)
    trainer = _read_json(ckpt / "trainer.json")
    for name, digest in (trainer.get("sha256") or {}).items():
        if _sha256(ckpt / name) != digest:
            raise _corrupt(ckpt / name, "its sha256 differs from the one in trainer.json "
                                        "(the file was changed or cut short)")
    _load_model(ckpt, model)
    rng = _load_optim(ckpt, optimizer) if optimizer is not None else {}
    return {"trainer": trainer, "rng": rng, "recipe": _read_json(ckpt / "recipe.json")}
