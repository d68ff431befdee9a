"""The machine a model runs on: the device, and process-level settings for CPUs.

:func:`pick_device`: the device a recipe or ``--device`` names, which must exist here.

:func:`tune_cpu_allocator`: glibc's malloc serves blocks above a threshold (at most 32 MiB) with
fresh ``mmap`` calls and returns them to the kernel on free, so every large activation of every
step is page-faulted and zeroed again, which dominates a step at long sequence lengths
(numbers: docs/design.md, "Keeping freed memory in glibc's malloc"). So the allocator is told to
keep freed memory (``M_MMAP_MAX=0``: no mmap for large blocks; a high ``M_TRIM_THRESHOLD``: no
trimming). The price is that the process keeps its peak heap until it exits, which suits a training run. The
PyTorch CPU performance guide recommends jemalloc or tcmalloc for the same reason; this needs
no extra library. Set ``HYCOMP_MALLOC_TUNING=0`` to leave the allocator alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

from composer.core.errors import RecipeError


def pick_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu; otherwise the named device, which must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise RecipeError(what=f"unknown device {name!r}", where="train.device", why=str(e),
                          fix="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(what="no CUDA device", where=f"train.device={name}",
                          why="torch sees no GPU on this machine",
                          fix="use train.device=auto or train.device=cpu")
    return dev


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_done = False


def tune_cpu_allocator() -> bool:
    """Tell glibc's malloc to keep and reuse freed memory; True when it took effect.

    Does nothing (False) off Linux/glibc or with ``HYCOMP_MALLOC_TUNING=0``; idempotent.
    """
    global _done
    if _done:
        return True
    if os.environ.get("HYCOMP_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    ok = (mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
          and mallopt(_M_TOP_PAD, 64 << 20) == 1)
    _done = ok
    return ok
