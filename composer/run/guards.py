"""Checks the trainer makes before and during a run, so a bad setting fails with a clear message
instead of a traceback, an exhausted machine, or a run of NaNs.

Before anything is allocated (:func:`check_before_training`):

* the recipe's shapes fit together: ``data.seq_len <= model.max_seq_len`` (positions beyond
  ``max_seq_len`` are outside the position tables);
* the estimated memory of a training step fits the machine (:func:`estimate_memory`, refused
  unless ``train.ignore_memory_check``);

After reading the data (:func:`check_data`): every byte value is below ``model.vocab_size``
(an error), and the text looks like text (a warning for binary data).

During training: :func:`finite` tells whether a loss or gradient norm is a real number; the
trainer skips the optimizer step of a non-finite one and stops with :class:`NonFiniteError`
(exit code 3) after ``train.max_bad_steps`` of them in a row. :func:`json_safe` turns NaN and
infinities into ``null`` so metrics.jsonl and summary.json stay strict JSON.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch

from composer.core.errors import DataError, HycompError, RecipeError

# Bytes per parameter in training: fp32 weight, gradient, and AdamW's two moments.
BYTES_PER_PARAM = 4 + 4 + 8
# Activations kept for backward per token and sub-layer, in units of d_model fp32 values: the
# norm input and output, the mixer's or MLP's projections (an MLP's hidden layer alone is
# 4 d_model wide, and is kept before and after its activation) and the residual sum. A rough
# middle of the blocks in this repository; the logits add 3 x vocab_size per token (logits, their
# fp32 copy and softmax in the cross-entropy).
ACT_WIDTHS_PER_SUBLAYER = 16
# Refuse when the estimate exceeds this share of the memory available.
MEMORY_SHARE = 0.9
# Binary data: warn when more than this share of the bytes are NUL or not valid UTF-8.
BINARY_SHARE = 0.05
_SAMPLE = 1 << 20


class NonFiniteError(HycompError):
    """Training diverged: ``train.max_bad_steps`` non-finite steps in a row."""

    exit_code = 3


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (JSON ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def available_memory(device: torch.device) -> int | None:
    """Bytes the run can still allocate: free GPU memory on CUDA; on CPU ``MemAvailable`` of
    /proc/meminfo (else free pages x page size); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(recipe) -> dict[str, int]:
    """Bytes a training step needs, from the layer graph (nothing is allocated): ``params``
    (count), ``weights`` (weights, gradients, AdamW moments: 16 bytes per parameter),
    ``activations`` (per micro-batch: batch_size x seq_len tokens x (sub-layers x
    ACT_WIDTHS_PER_SUBLAYER x d_model + 3 x vocab_size) fp32 values), ``total``."""
    import composer
    from composer.build.costs import totals
    g = composer.layer_graph(recipe)
    m, cfg = recipe.model, recipe.train
    n_params = totals(g, recipe.data.seq_len)["params"]
    n_sub = sum(1 for _, a in g.nodes(data=True) if a.get("op") in ("residual", "combine"))
    tokens = cfg.batch_size * recipe.data.seq_len
    acts = 4 * tokens * (max(1, n_sub) * ACT_WIDTHS_PER_SUBLAYER * m.d_model + 3 * m.vocab_size)
    weights = BYTES_PER_PARAM * n_params
    return {"params": n_params, "weights": weights, "activations": acts,
            "total": weights + acts}


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_before_training(recipe, device: torch.device) -> None:
    """Raise before anything is allocated when the recipe cannot train here (module docstring)."""
    m, d = recipe.model, recipe.data
    if d.seq_len > m.max_seq_len:
        raise RecipeError(what="data.seq_len is longer than model.max_seq_len",
                          where=f"data.seq_len={d.seq_len}, model.max_seq_len={m.max_seq_len}",
                          why="positions beyond max_seq_len are outside the model's position "
                              "tables (RoPE)",
                          fix=f"lower data.seq_len to at most {m.max_seq_len}, or raise "
                              f"model.max_seq_len to at least {d.seq_len}")
    if recipe.train.ignore_memory_check:
        return
    est, avail = estimate_memory(recipe), available_memory(device)
    if avail is not None and est["total"] > MEMORY_SHARE * avail:
        raise HycompError(
            what=f"the run needs about {_gb(est['total'])}, more than this machine has free",
            where=f"model.d_model={m.d_model}, {est['params']:,} parameters, "
                  f"train.batch_size={recipe.train.batch_size}, data.seq_len={d.seq_len}, "
                  f"device {device}",
            why=f"estimate: {_gb(est['weights'])} for weights, gradients and AdamW state "
                f"(16 bytes per parameter) + {_gb(est['activations'])} of activations per "
                f"micro-batch; available: {_gb(avail)}",
            fix="make the model smaller (model.d_model, model.n_layers), lower "
                "train.batch_size (raise train.grad_accum instead) or data.seq_len; or try "
                "anyway with train.ignore_memory_check=true")


def text_share(data: torch.Tensor) -> tuple[float, float]:
    """(share of NUL bytes, share of bytes in invalid UTF-8 sequences) of the first MiB."""
    blob = bytes(data[:_SAMPLE].numpy())
    if not blob:
        return 0.0, 0.0
    bad = blob.decode("utf-8", errors="replace").count("\ufffd") - \
        blob.decode("utf-8", errors="ignore").count("\ufffd")
    return blob.count(0) / len(blob), bad / len(blob)


def _path(recipe) -> str:
    return recipe.data.path or "null (the standard library)"


def check_data(recipe, train: torch.Tensor, val: torch.Tensor) -> str | None:
    """Raise :class:`DataError` when a byte value does not fit ``model.vocab_size``; return a
    warning (or None) when the training bytes do not look like text."""
    vocab = recipe.model.vocab_size
    top = max(int(train.max()), int(val.max()) if val.numel() else 0)
    if top >= vocab:
        raise DataError(what="the data holds byte values the vocabulary does not have",
                        where=f"model.vocab_size={vocab}, data.path={_path(recipe)}",
                        why=f"tokens are bytes; the data holds byte {top}, and a vocabulary "
                            f"of {vocab} has ids 0..{vocab - 1}",
                        fix=f"use model.vocab_size={max(256, top + 1)} (bytes need 256)")
    nul, bad = text_share(train)
    if nul + bad > BINARY_SHARE:
        return (f"warning: the training data does not look like text: {nul:.0%} NUL bytes, "
                f"{bad:.0%} of the bytes not valid UTF-8 (data.path={_path(recipe)}); "
                f"training on it anyway")
    return None
