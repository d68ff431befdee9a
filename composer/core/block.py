"""The block contract: a Pydantic spec plus an ``nn.Module`` with three modes.

Every block is built as ``Module(spec, d_model)`` and offers

* ``forward(x, state=None) -> (y, new_state)``  whole sequence, x: (B, T, D)
* ``init_state(batch, device, dtype)``          the state before the first token
* ``step(x_t, state) -> (y_t, new_state)``      one token, x_t: (B, D)

with two guarantees, each tested per block: ``forward`` over ``x[:, :a]`` then over
``x[:, a:]`` with the returned state equals ``forward(x)``; ``step`` equals the matching row of
``forward``. Blocks without sequence state (FFNs) return ``None`` as state.

Cost hooks (class methods, used by the layer graph and ``hycomp check``):
``flops_per_token(spec, d_model, T)`` forward FLOPs per token at context length ``T`` and
``state_bytes(spec, d_model, T, dtype_bytes)`` recurrent state or KV cache per sequence.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class Spec(BaseModel):
    """Base of every recipe section: unknown keys are errors, fields carry docstrings."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              validate_default=True)


class BlockSpec(Spec):
    """Base of every block's settings. Subclasses add ``kind: Literal[...]`` and their fields."""

    kind: str

    def problems(self, d_model: int, max_seq_len: int) -> list[tuple[str, Any, str, str]]:
        """Cross-field checks that need the model's width or length.

        Returns ``(field, value, why, fix)`` tuples; empty when the spec fits.
        """
        return []


class Block(nn.Module):
    """Base class of block modules; subclasses implement ``forward`` and ``init_state``."""

    def __init__(self, spec: BlockSpec, d_model: int):
        super().__init__()
        self.spec = spec
        self.d_model = d_model

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
        return None

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """One token: x_t (B, D) -> y_t (B, D). Default: a length-1 ``forward``."""
        y, state = self.forward(x_t[:, None], state)
        return y[:, 0], state

    @classmethod
    def state_bytes(cls, spec: BlockSpec, d_model: int, T: int, dtype_bytes: int = 4) -> int:
        return 0


def linear_flops(*shapes: tuple[int, int]) -> float:
    """Forward FLOPs per token of dense layers with the given (in, out) shapes: 2·in·out each."""
    return float(sum(2 * i * o for i, o in shapes))


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for recurrent states and scans: float64 for float64 inputs, else float32 (bf16
    activations keep an fp32 state)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(fn):
    """Run ``fn`` with autocast off. For the recurrence backends: they cast their inputs to
    :func:`accum_dtype` themselves and must keep their products there; under a bf16 autocast
    each matmul would round back to bf16 (and an in-place product into a float32 buffer
    fails). The first tensor argument names the device."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None or not torch.is_autocast_enabled(x.device.type):
            return fn(*args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return fn(*args, **kwargs)
    return wrapped


def state_leaves(state: Any):
    """The objects inside a (nested) block or model state: tensors, caches, positions; dicts,
    lists and tuples are walked, None is skipped."""
    if isinstance(state, dict):
        for v in state.values():
            yield from state_leaves(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from state_leaves(v)
    elif state is not None:
        yield state


def state_nbytes(state: Any) -> int:
    """Bytes of a block's (or a model's) state: every tensor in it plus objects that report
    ``nbytes`` themselves (a KV cache: its buffers); counters count nothing."""
    return sum(int(x.nbytes) for x in state_leaves(state) if hasattr(x, "nbytes"))
