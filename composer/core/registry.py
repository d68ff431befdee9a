"""Explicit registries: block types and kernel backends.

`composer` knows these protocols, not concrete blocks. The `blocks` package (and any third-party
package exposing the ``hycomp.blocks`` entry-point group) registers into them on import;
:func:`load_plugins` runs those imports the first time a registry is read.

Block registry
    name -> :class:`BlockType` (Pydantic spec class, ``nn.Module`` class, pattern symbol, role).
Kernel registry
    op name -> backend name -> :class:`Backend` (a callable plus what it supports).

Duplicate registrations raise; unknown names raise with the valid names and a did-you-mean.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable, Literal

import torch

from composer.core.errors import HycompError

Role = Literal["mixer", "ffn", "composite"]


def did_you_mean(word: str, options) -> str:
    """"; did you mean 'x'?" for the closest option, or ''."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockType:
    """One registered block family.

    name:    registry key used in recipes (``mamba2``, ``attention``, ...)
    spec:    Pydantic model (``extra="forbid"``) holding the block's fields
    module:  ``nn.Module`` class, constructed as ``module(spec, d_model)``
    role:    ``mixer`` (sequence mixing), ``ffn`` (per-token), or ``composite`` (holds others)
    symbol:  default pattern-string symbol, if any (Megatron-LM symbols where they exist)
    """

    name: str
    spec: type
    module: type
    role: Role
    symbol: str | None = None
    summary: str = ""


_BLOCKS: dict[str, BlockType] = {}
_PLUGINS_LOADED = False


def register_block(name: str, *, spec: type, role: Role, symbol: str | None = None,
                   summary: str = "") -> Callable[[type], type]:
    """Class decorator registering an ``nn.Module`` as block type ``name``."""

    def deco(module_cls: type) -> type:
        if name in _BLOCKS:
            raise ValueError(f"block type '{name}' is already registered by "
                             f"{_BLOCKS[name].module.__module__}")
        for hook in ("flops_per_token", "state_bytes", "init_state"):
            if not callable(getattr(module_cls, hook, None)):
                raise TypeError(f"block '{name}' ({module_cls.__name__}) lacks {hook}()")
        if symbol is not None:
            for other in _BLOCKS.values():
                if other.symbol == symbol:
                    raise ValueError(f"pattern symbol '{symbol}' of block '{name}' is already "
                                     f"used by block '{other.name}'")
        _BLOCKS[name] = BlockType(name, spec, module_cls, role, symbol,
                                  summary or (module_cls.__doc__ or "").strip().split("\n")[0])
        return module_cls

    return deco


def load_plugins() -> None:
    """Import the built-in blocks and every ``hycomp.blocks`` entry point, once."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    importlib.import_module("blocks")
    for ep in entry_points(group="hycomp.blocks"):
        if ep.value == "blocks":
            continue
        ep.load()


def block_types() -> dict[str, BlockType]:
    load_plugins()
    return dict(_BLOCKS)


def get_block(name: str) -> BlockType:
    load_plugins()
    try:
        return _BLOCKS[name]
    except KeyError:
        raise HycompError(
            what=f"unknown block type '{name}'",
            why=f"registered block types are: {', '.join(sorted(_BLOCKS))}",
            fix="use one of those names" + did_you_mean(name, _BLOCKS),
        ) from None


def default_symbols() -> dict[str, str]:
    """Pattern symbol -> block name, from the registered blocks."""
    return {bt.symbol: bt.name for bt in block_types().values() if bt.symbol}


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    fn:        the implementation; every backend of an op has the same signature
    devices:   device types it runs on (``cpu``, ``cuda``)
    dtypes:    dtypes it accepts
    priority:  higher wins under ``auto`` among the backends that fit
    available: returns None when usable here, else a sentence saying how to get it
    accepts:   called with a call's arguments; None when the backend handles them, else a
               sentence saying which shapes it handles (None: every shape the op allows)
    pure:      written in PyTorch alone; False for compiled code of its own (C, Triton), which
               the benchmarks report beside the best pure-PyTorch backend, not instead of it
    """

    op: str
    name: str
    fn: Callable
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[torch.dtype] = frozenset({torch.float32, torch.float64, torch.bfloat16,
                                                torch.float16})
    priority: int = 0
    available: Callable[[], str | None] = field(default=lambda: None)
    summary: str = ""
    accepts: Callable[..., str | None] | None = None
    shapes: str = "any"
    pure: bool = True

    def refuses(self, args, kwargs) -> str | None:
        """None when this backend handles a call with these arguments, else why not."""
        return None if self.accepts is None else self.accepts(*args, **kwargs)

    def fits(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type in self.devices and dtype in self.dtypes and self.available() is None


_OPS: dict[str, dict[str, Backend]] = {}
_OP_DOCS: dict[str, str] = {}


def register_op(op: str, doc: str) -> None:
    if op in _OP_DOCS:
        raise ValueError(f"op '{op}' is already registered")
    _OP_DOCS[op] = doc
    _OPS[op] = {}


def register_backend(op: str, name: str, *, priority: int = 0,
                     devices=("cpu", "cuda"), dtypes=None,
                     available: Callable[[], str | None] | None = None,
                     accepts: Callable[..., str | None] | None = None,
                     summary: str = "", pure: bool = True) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as backend ``name`` of ``op``.

    ``accepts`` (optional) declares the shapes it handles: called with each call's arguments,
    it returns None or a sentence saying what it handles. Under ``auto`` a call goes to the
    highest-priority backend that fits the device and dtype *and* accepts the call; its
    docstring's first line is shown by ``hycomp kernels``. ``pure=False`` marks a backend
    that runs compiled code of its own rather than PyTorch ops.
    """

    def deco(fn: Callable) -> Callable:
        if op not in _OPS:
            raise ValueError(f"register op '{op}' before its backends")
        if name == "auto":
            raise ValueError("'auto' is reserved for automatic selection")
        if name in _OPS[op]:
            raise ValueError(f"backend '{name}' of op '{op}' is already registered")
        kw = {}
        if dtypes is not None:
            kw["dtypes"] = frozenset(dtypes)
        if available is not None:
            kw["available"] = available
        if accepts is not None:
            kw["accepts"] = accepts
            kw["shapes"] = (accepts.__doc__ or "some shapes").strip().split("\n")[0]
        _OPS[op][name] = Backend(op, name, fn, frozenset(devices), priority=priority,
                                 summary=summary or (fn.__doc__ or "").strip().split("\n")[0],
                                 pure=pure, **kw)
        return fn

    return deco


def ops() -> dict[str, dict[str, Backend]]:
    load_plugins()
    return {op: dict(b) for op, b in _OPS.items()}


def op_doc(op: str) -> str:
    load_plugins()
    return _OP_DOCS[op]


def resolve_backend(op: str, choice: str, device: torch.device, dtype: torch.dtype,
                    call: tuple[tuple, dict] | None = None) -> Backend:
    """The backend that runs ``op`` for this device and dtype (and, given ``call`` = (args,
    kwargs), for these shapes).

    ``choice`` is ``auto`` (highest-priority backend that fits) or a backend name, which must
    exist and fit, else a :class:`HycompError` says why and how to get it.
    """
    return pick(candidates(op, choice, device, dtype), choice, call)


def pick(cands: list[Backend], choice: str, call: tuple[tuple, dict] | None) -> Backend:
    """The first of ``cands`` (from :func:`candidates`) that accepts ``call``."""
    if call is None:
        return next((b for b in cands if b.accepts is None), cands[-1])
    reasons = []
    for b in cands:
        why = b.refuses(*call)
        if why is None:
            return b
        reasons.append(f"'{b.name}': {why}")
    op = cands[0].op
    raise HycompError(
        what=f"backend '{choice}' of op '{op}' does not handle this call" if choice != "auto"
        else f"no backend of op '{op}' handles this call",
        where=f"kernels.{op}", why="; ".join(reasons),
        fix=f"set kernels.{op}=auto, which picks a backend that does" if choice != "auto"
        else "this is a bug in the op's backends: please report it")


def candidates(op: str, choice: str, device: torch.device, dtype: torch.dtype) -> list[Backend]:
    """The backends that may run ``op`` here, best first: under ``auto`` every fitting one by
    priority (which one runs may depend on the call's shapes), else the one named."""
    table = ops()
    if op not in table:
        raise HycompError(what=f"unknown op '{op}'", why=f"ops are: {', '.join(sorted(table))}",
                          fix="pick one of those" + did_you_mean(op, table))
    backends = table[op]
    if choice == "auto":
        fitting = [b for b in backends.values() if b.fits(device, dtype)]
        if not fitting:
            raise HycompError(
                what=f"no backend of op '{op}' runs on {device.type} with {dtype}",
                why=f"backends: {', '.join(backends)}",
                fix="run on another device or dtype")
        return sorted(fitting, key=lambda b: -b.priority)
    if choice not in backends:
        raise HycompError(what=f"unknown backend '{choice}' for op '{op}'",
                          where=f"kernels.{op}",
                          why=f"backends of '{op}': auto, {', '.join(backends)}",
                          fix="pick one of those" + did_you_mean(choice, backends))
    b = backends[choice]
    missing = b.available()
    if missing:
        raise HycompError(what=f"backend '{choice}' of op '{op}' is not available here",
                          where=f"kernels.{op}", why=missing,
                          fix=f"install what it needs, or set kernels.{op}=auto")
    if not b.fits(device, dtype):
        raise HycompError(
            what=f"backend '{choice}' of op '{op}' does not run on {device.type} with {dtype}",
            where=f"kernels.{op}",
            why=f"it supports devices {sorted(b.devices)} and dtypes "
                f"{sorted(str(d).replace('torch.', '') for d in b.dtypes)}",
            fix=f"set kernels.{op}=auto or change device/dtype")
    return [b]
