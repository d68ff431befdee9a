"""Calling ops by name: blocks write ``op("attention")(q, k, v, ...)``.

The backend is chosen per call from the active kernel choices (a recipe's ``kernels`` section,
made active by :func:`use_kernels`; the composed model does this around its forward), the
device and the dtype of the first tensor argument. ``auto`` takes the highest-priority backend
that fits and accepts the call's shapes. The list of candidates per (op, choice, device, dtype)
is cached; the shape check runs per call.
"""
from __future__ import annotations

import contextlib
import contextvars
from functools import lru_cache
from typing import Callable, Iterator

import torch

from composer.core.registry import Backend, candidates, pick

_CHOICES: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "hycomp_kernels", default=())


@contextlib.contextmanager
def use_kernels(choices: dict[str, str] | None) -> Iterator[None]:
    """Make ``choices`` (op -> backend name or ``auto``) active inside the block."""
    token = _CHOICES.set(tuple(sorted((choices or {}).items())))
    try:
        yield
    finally:
        _CHOICES.reset(token)


@lru_cache(maxsize=None)
def _candidates(name: str, choice: str, device_type: str, dtype: torch.dtype) -> list[Backend]:
    return candidates(name, choice, torch.device(device_type), dtype)


@lru_cache(maxsize=256)
def _choice_map(choices: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return dict(choices)


def current_choice(name: str) -> str:
    return _choice_map(_CHOICES.get()).get(name, "auto")


@lru_cache(maxsize=None)
def op(name: str) -> Callable:
    """A callable running op ``name`` with the backend the active choices pick (one callable
    per op: a decode step calls several ops per token, each lookup counts)."""

    def call(*args, **kwargs):
        x = args[0] if isinstance(args[0], torch.Tensor) else next(
            a for a in args if isinstance(a, torch.Tensor))
        choice = _choice_map(_CHOICES.get()).get(name, "auto")
        cands = _candidates(name, choice, x.device.type, x.dtype)
        if len(cands) == 1 and cands[0].accepts is None:
            return cands[0].fn(*args, **kwargs)
        return pick(cands, choice, (args, kwargs)).fn(*args, **kwargs)

    return call
