"""Fixtures for the op tests: every uninitialised allocation is poisoned with NaN.

As fla's test suite does, so that a kernel reading memory it never wrote gives NaN and fails
the comparison with its reference instead of passing on whatever the allocator left there.
"""
from __future__ import annotations

import functools
import sys

import pytest
import torch

from composer.core.registry import ops

ALLOCATORS = ("empty", "empty_like", "empty_strided")
"""torch functions that return uninitialised memory (besides ``Tensor.new_empty``)."""


def _poisoning(orig, stats: dict):
    """``orig`` (an allocator) returning floating tensors filled with NaN, others untouched;
    every argument (sizes, ``out=``, ``dtype=``, ``device=``, ``requires_grad=``, ...) goes
    through as given."""

    @functools.wraps(orig)
    def poisoned(*args, **kwargs):
        out = orig(*args, **kwargs)
        if isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()):
            with torch.no_grad():           # a leaf made with requires_grad=True stays a leaf
                out.fill_(float("nan"))
            stats["poisoned"] += 1
        return out

    poisoned.__hycomp_poisoned__ = True
    return poisoned


def _project_packages() -> set[str]:
    """Top-level packages whose modules may hold torch's allocators under their own names
    (``from torch import empty``): this project's and every registered backend's."""
    pkgs = {"blocks", "composer"}
    for backends in ops().values():
        for b in backends.values():
            pkgs.add((getattr(b.fn, "__module__", None) or "").partition(".")[0])
    pkgs.discard("")
    pkgs.discard("torch")
    return pkgs


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    """Make every ``torch.empty``, ``torch.empty_like``, ``torch.empty_strided`` and
    ``Tensor.new_empty`` allocation of a floating dtype come back filled with NaN (integer and
    bool dtypes untouched), here and in any project module that imported them by name, so a
    kernel reading memory it never wrote produces NaN. Yields a dict whose ``poisoned`` entry
    counts the poisoned allocations (``allocators`` and ``packages`` say what was patched
    where). The compiled ``native`` backend allocates its outputs and gradients with torch in
    Python before handing pointers to C: covered too."""
    stats = {"poisoned": 0, "patched_in": [], "allocators": ALLOCATORS + ("new_empty",),
             "packages": _project_packages()}
    originals = {name: getattr(torch, name) for name in ALLOCATORS}
    for name, orig in originals.items():
        if getattr(orig, "__hycomp_poisoned__", False):       # nested use: already patched
            continue
        monkeypatch.setattr(torch, name, _poisoning(orig, stats))
    if not getattr(torch.Tensor.new_empty, "__hycomp_poisoned__", False):
        monkeypatch.setattr(torch.Tensor, "new_empty",
                            _poisoning(torch.Tensor.new_empty, stats))
    pkgs = stats["packages"]
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod_name.partition(".")[0] not in pkgs:
            continue
        for attr, value in list(vars(mod).items()):
            for name, orig in originals.items():
                if value is orig:
                    monkeypatch.setattr(mod, attr, getattr(torch, name))
                    stats["patched_in"].append(f"{mod_name}.{attr}")
    yield stats
