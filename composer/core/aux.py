"""Auxiliary losses from blocks (an MoE router's load-balancing loss, say) to the trainer.

A block calls :func:`add_aux_loss` inside its forward with a scalar tensor already scaled by
its own coefficient. The composed model collects every call of one forward (a shared module
visited twice adds twice) and exposes the sum as ``model.aux_loss`` (None when no block added
any); the trainer adds it to the language-modelling loss.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

_SINK: contextvars.ContextVar[list | None] = contextvars.ContextVar("hycomp_aux", default=None)


def add_aux_loss(loss: torch.Tensor) -> None:
    """Record an auxiliary loss of the current forward (ignored outside a collecting model)."""
    sink = _SINK.get()
    if sink is not None:
        sink.append(loss)


@contextlib.contextmanager
def collect_aux_losses() -> Iterator[list]:
    """Collect the auxiliary losses added inside the block into the yielded list."""
    sink: list = []
    token = _SINK.set(sink)
    try:
        yield sink
    finally:
        _SINK.reset(token)
