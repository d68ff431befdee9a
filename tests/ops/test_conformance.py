"""Conformance: every registered backend of every op equals that op's ``reference`` backend.

The (op, backend) pairs come from the kernel registry at collection time, so a backend
registered later is tested here without editing this file; an op without input generators in
``CASES`` fails (it does not skip) until someone adds them. Each op has a table of calls
covering what the op allows (gate forms, extreme gates, shared heads, masks, offsets, T = 1,
T past and at whole chunks, batch > 1, an initial state or none, non-contiguous inputs). For
each call a backend must give the reference's outputs, final state and the gradient of every
floating input under a random upstream gradient, in float64 (to 1e-8) and in float32 (to 1e-4,
against the float64 reference run on the same float32-rounded inputs), measured as
max |got - want| / max |want| per tensor. A case is skipped only where the backend says it
cannot run it: ``available()`` gives a reason, the device or dtype is outside its declared
sets, or ``refuses(args, kwargs)`` gives a reason.

Every ``torch.empty`` / ``empty_like`` / ``empty_strided`` / ``Tensor.new_empty`` made while
these tests run is filled with NaN (``nan_poisoned_empty`` in tests/ops/conftest.py, for every
op test), so a kernel that reads memory it never wrote gives NaN and fails.

Helpers are local to this file on purpose (no imports from other test modules); backends are
reached only through the registry, never by importing their modules.
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
import zlib
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from composer.core.registry import ops

F64, F32 = torch.float64, torch.float32
DTYPES = (F64, F32)
DTYPE_TAG = {F64: "f64", F32: "f32"}
DEVICES = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())
TOL = {F64: 1e-8, F32: 1e-4}
"""Largest max |got - want| / max |want| per tensor (output, final state, each gradient)."""
FLOOR = {F64: 1e-280, F32: 1e-30}
"""Smallest max |want| the tolerance scales with: a tensor whose entries all lie below it (a
gradient through 67 gates of exp(-30)) is compared in absolute terms, where float32 has no
digits left and float64 only denormals."""
NOISE = {F64: 100 * torch.finfo(F64).eps, F32: 100 * torch.finfo(F32).eps}
"""A tensor that is exactly 0 in the reference (the gradient of q where each query sees one
key: softmax is constant there) has no scale of its own: the backend's may be rounding noise
of O(1) terms that cancel, up to this times the largest entry of any output or gradient of
the call. Tiny but non-zero tensors (gradients of gates near 0, 1e-18 of the largest) are
compared relative to themselves."""


def test_nan_poisoning_fixture(nan_poisoned_empty):
    """Inside the fixture fresh floating memory is all NaN whichever allocator made it and
    whatever was passed through; integer memory is left alone."""
    x = torch.ones(2, 3, dtype=F64)
    made = [torch.empty(3), torch.empty((2, 2), dtype=F64), torch.empty(2, 3, device="cpu"),
            torch.empty_like(x), torch.empty_like(x, dtype=F32),
            torch.empty_strided((2, 3), (1, 2)), x.new_empty((4,)), x.new_empty(5, dtype=F32)]
    for t in made:
        assert t.numel() and torch.isnan(t).all()
    assert made[1].dtype == F64 and made[4].dtype == F32 and made[7].dtype == F32
    assert made[5].stride() == (1, 2)
    out = torch.zeros(7)
    assert torch.empty(7, out=out) is out and torch.isnan(out).all()
    leaf = torch.empty(3, requires_grad=True)
    assert leaf.is_leaf and leaf.requires_grad and torch.isnan(leaf.detach()).all()
    ints = torch.empty(4, dtype=torch.int64)
    assert ints.dtype == torch.int64            # not filled (NaN has no integer value)
    assert torch.empty(0).numel() == 0
    assert torch.empty(2, device="meta").is_meta
    # a kernel that writes only part of what it allocates gives NaN, which the checks catch
    partial = torch.empty(4)
    partial[:3] = 1.0
    assert torch.isnan(partial[3])
    assert nan_poisoned_empty["poisoned"] >= len(made) + 3


def test_nan_poisoning_reaches_every_backend_module(nan_poisoned_empty):
    """No module of this project or of a registered backend still holds the unpatched
    allocators under a name of its own while the fixture is active, and the allocations the
    backends make from Python (the V = 1 scans and the native scan allocate their outputs and
    gradients with torch.empty) are poisoned: at least one backend call below makes some."""
    pkgs = nan_poisoned_empty["packages"]
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod_name.partition(".")[0] not in pkgs:
            continue
        for attr, value in vars(mod).items():
            if callable(value) and getattr(value, "__name__", None) in nan_poisoned_empty[
                    "allocators"] and (getattr(value, "__module__", None) or "").startswith(
                    "torch"):
                assert getattr(value, "__hycomp_poisoned__", False), \
                    f"{mod_name}.{attr} is torch's unpoisoned {value.__name__}"
    before = nan_poisoned_empty["poisoned"]
    ran = []
    for op_name, backends in ops().items():
        if op_name not in CASES:
            continue
        for name, backend in backends.items():
            if backend.available() is not None or "cpu" not in backend.devices:
                continue
            for case in CASES[op_name].values():
                args, kwargs = _build(op_name, case, F64, "cpu")
                if backend.refuses(args, kwargs) is None:
                    _run(backend.fn, args, kwargs, None, case.loss_on)
                    ran.append(f"{op_name}-{name}")
                    break
    assert ran and nan_poisoned_empty["poisoned"] > before, \
        f"no poisoned allocation during {ran}: is the fixture reaching the backends?"


# --------------------------------------------------------------------------------------------
# Input generators, one table per op
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One call of an op: ``params`` for its generator; ``loss_on`` the outputs the upstream
    gradient flows into (None: all of them; (0,): the output only, so the final state's
    gradient reaches the backward as None, as in training)."""

    name: str
    params: dict = field(default_factory=dict)
    loss_on: tuple[int, ...] | None = None


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _log_gate(u: torch.Tensor, strength: str, g: torch.Generator) -> torch.Tensor:
    """Log gates (<= 0) from uniforms u: ``normal`` in [-1, 0], ``near1`` (g ~ 1, log g ~
    -1e-6), ``near0`` (g ~ 1e-13..1e-22), ``zero`` (exp underflows to exactly 0) and ``mixed``
    (each entry one of those or exactly 0)."""
    forms = {"exact1": torch.zeros_like(u), "near1": -1e-6 * u, "normal": -u,
             "near0": -30 - 20 * u, "zero": -1e4 * (1 + u)}
    if strength != "mixed":
        return forms[strength]
    pick = torch.randint(0, len(forms), u.shape, generator=g)
    return torch.stack(list(forms.values()), -1).gather(-1, pick[..., None])[..., 0]


def _tensor(shape, g, dtype, layout="contiguous", kind="normal") -> torch.Tensor:
    """A random tensor, normal or (``kind="uniform"``) uniform in [0, 1), drawn in float64 and
    rounded to dtype, laid out as :func:`_finish` says."""
    if kind == "normal":
        t = torch.randn(tuple(shape), generator=g, dtype=F64)
    else:
        t = torch.rand(tuple(shape), generator=g, dtype=F64)
    return _finish(t, layout).to(dtype)


def _finish(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t in ``layout``: ``strided`` a non-contiguous view (its first two dims transposed in
    memory, as a (T, B, ...) buffer viewed batch-first), anything else contiguous. ``.to``
    keeps these strides."""
    if layout == "strided" and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t.contiguous()


def glr_inputs(g, dtype, *, T, chunk=16, B=2, H=2, Hk=None, K=8, V=8, gate="scalar",
               strength="normal", state=True, layout="contiguous", qk_ones=False):
    """gated_linear_recurrence(q, k, v, log_g, state, chunk_size=, A=): q, k (B, T, Hk, K),
    v (B, T, H, V), state (B, H, K, V); ``gate`` none, scalar (B, T, H), vector (B, T, H, K)
    or A (log_g = dt > 0 of (B, T, H) with A (H, K) < 0, Mamba-1). ``qk_ones``: q = k = 1
    (RG-LRU's call). ``layout``: contiguous, strided (every tensor a non-contiguous view) or
    expanded (the gate one draw per head broadcast over B and T, stride 0: RetNet's fixed
    decays)."""
    Hk = H if Hk is None else Hk
    gate_layout, layout = layout, ("strided" if layout == "strided" else "contiguous")
    if qk_ones:
        q = torch.ones(B, T, Hk, K, dtype=dtype)
        k = torch.ones(B, T, Hk, K, dtype=dtype)
    else:
        q = _tensor((B, T, Hk, K), g, dtype, layout)
        k = _finish(_tensor((B, T, Hk, K), g, F64) / math.sqrt(K), layout).to(dtype)
    v = _tensor((B, T, H, V), g, dtype, layout)
    A = None
    if gate == "none":
        log_g = None
    elif gate == "scalar":
        log_g = _log_gate(_tensor((B, T, H), g, F64, kind="uniform"), strength, g)
    elif gate == "vector":
        log_g = _log_gate(_tensor((B, T, H, K), g, F64, kind="uniform"), strength, g)
    elif gate == "A":
        log_g = _tensor((B, T, H), g, F64, kind="uniform") + 0.05                # dt > 0
        scales = {"near1": 1e-6, "normal": 1.0, "near0": 60.0, "zero": 1e4}
        if strength == "mixed":
            pick = torch.randint(0, len(scales), (H, K), generator=g)
            scale = torch.tensor(list(scales.values()), dtype=F64)[pick]
        else:
            scale = scales[strength]
        A = _finish(-scale * (_tensor((H, K), g, F64, kind="uniform") + 0.5), layout).to(dtype)
    else:
        raise ValueError(gate)
    if log_g is not None:
        if gate_layout == "expanded":
            log_g = log_g[:1, :1].to(dtype).expand(log_g.shape)
        else:
            log_g = _finish(log_g, layout).to(dtype)
    s0 = _tensor((B, H, K, V), g, dtype, layout) if state else None
    kwargs = {"chunk_size": chunk}
    if A is not None:
        kwargs["A"] = A
    return (q, k, v, log_g, s0), kwargs


def delta_inputs(g, dtype, *, T, chunk=16, B=2, H=2, K=8, V=8, form="plain", decay=None,
                 strength="normal", state=True, layout="contiguous"):
    """delta_rule(q, k, v, b, log_w, state, a=, chunk_size=): unit keys; ``form`` plain
    (b = -beta per token, a = k: DeltaNet / Gated DeltaNet), bvec (b a vector, a = k) or dplr
    (a = -kappa, b = kappa * a_icl: RWKV-7); ``decay`` None, head (B, T, H) or key
    (B, T, H, K)."""
    q = _finish(_tensor((B, T, H, K), g, F64) / math.sqrt(K), layout).to(dtype)
    k = _finish(F.normalize(_tensor((B, T, H, K), g, F64), dim=-1), layout).to(dtype)
    v = _tensor((B, T, H, V), g, dtype, layout)
    log_w = None
    if decay is not None:
        shape = (B, T, H) if decay == "head" else (B, T, H, K)
        log_w = _finish(_log_gate(_tensor(shape, g, F64, kind="uniform"), strength, g),
                        layout).to(dtype)
    a = None
    if form == "plain":
        b = _finish(-_tensor((B, T, H), g, F64, kind="uniform"), layout).to(dtype)
    elif form == "bvec":         # I - (u * k) k^T: eigenvalues in (0, 1]
        b = _finish(-_tensor((B, T, H, K), g, F64, kind="uniform") * k.to(F64),
                    layout).to(dtype)
    elif form == "dplr":
        kappa = F.normalize(_tensor((B, T, H, K), g, F64), dim=-1)
        b = _finish(kappa * _tensor((B, T, H, K), g, F64, kind="uniform"), layout).to(dtype)
        a = _finish(-kappa, layout).to(dtype)
    else:
        raise ValueError(form)
    s0 = _tensor((B, H, K, V), g, dtype, layout) if state else None
    kwargs = {"chunk_size": chunk}
    if a is not None:
        kwargs["a"] = a
    return (q, k, v, b, log_w, s0), kwargs


def attention_inputs(g, dtype, *, Tq, Tk=None, B=2, Hq=2, Hkv=None, D=8, q_pos0=0, k_pos0=0,
                     window=None, block_size=None, G=0, scale=None, layout="contiguous"):
    """attention(q, k, v, q_pos0=, k_pos0=, window=, scale=, block_size=, k_global=,
    v_global=): q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D), global keys (B, Hkv, G, D)."""
    Tk = Tq if Tk is None else Tk
    Hkv = Hq if Hkv is None else Hkv
    q = _tensor((B, Hq, Tq, D), g, dtype, layout)
    k = _tensor((B, Hkv, Tk, D), g, dtype, layout)
    v = _tensor((B, Hkv, Tk, D), g, dtype, layout)
    kwargs = {"q_pos0": q_pos0, "k_pos0": k_pos0}
    for name, value in (("window", window), ("block_size", block_size), ("scale", scale)):
        if value is not None:
            kwargs[name] = value
    if G:
        kwargs["k_global"] = _tensor((B, Hkv, G, D), g, dtype, layout)
        kwargs["v_global"] = _tensor((B, Hkv, G, D), g, dtype, layout)
    return (q, k, v), kwargs


def _table(*cases: Case) -> dict[str, Case]:
    return {c.name: c for c in cases}


GLR = _table(
    # linear attention (no gate), V > 1
    Case("linattn_T67_c16", dict(T=67, gate="none")),
    Case("linattn_T1_nostate", dict(T=1, gate="none", state=False)),
    # one gate per head: RetNet, Mamba-2 (q, k shared by the heads of a group)
    Case("scalar_T64_c16_B3_nostate", dict(T=64, B=3, state=False)),
    Case("scalar_near0_T67_c64", dict(T=67, chunk=64, strength="near0")),
    Case("scalar_near1_T17_c16", dict(T=17, strength="near1")),
    Case("scalar_zero_T67_c16", dict(T=67, strength="zero")),
    Case("mamba2_mixed_T67_c16_grouped", dict(T=67, H=4, Hk=1, strength="mixed")),
    Case("retnet_expanded_T33_c16", dict(T=33, layout="expanded")),
    Case("scalar_T67_c16_loss_on_o", dict(T=67, strength="mixed"), loss_on=(0,)),
    # one gate per key dim: GLA
    Case("vector_T67_c16", dict(T=67, gate="vector")),
    Case("vector_near0_T64_c16_nostate", dict(T=64, gate="vector", strength="near0",
                                              state=False)),
    Case("vector_mixed_T17_c16_grouped", dict(T=17, H=4, Hk=2, gate="vector",
                                              strength="mixed")),
    Case("vector_near1_T1", dict(T=1, gate="vector", strength="near1")),
    Case("vector_near1_T67_c64_strided", dict(T=67, chunk=64, gate="vector",
                                              strength="near1", layout="strided")),
    # V = 1 (the diagonal shapes the scans take), every gate form
    Case("diag_none_T67_c16_grouped", dict(T=67, H=4, Hk=1, V=1, gate="none")),
    Case("diag_scalar_T67_c16_grouped", dict(T=67, H=4, Hk=2, V=1)),
    Case("diag_vector_mixed_T67_c16", dict(T=67, H=4, V=1, gate="vector", strength="mixed")),
    # Mamba-1: dt with A (H, K), q = C and k = B shared by all heads, V = 1
    Case("mamba1_T67_c16", dict(T=67, H=4, Hk=1, V=1, gate="A")),
    Case("mamba1_near0_T17_c16_nostate", dict(T=17, H=4, Hk=1, V=1, gate="A",
                                              strength="near0", state=False)),
    Case("mamba1_near1_T64_c16_loss_on_o", dict(T=64, H=4, Hk=1, V=1, gate="A",
                                                strength="near1"), loss_on=(0,)),
    Case("mamba1_T1", dict(T=1, H=4, Hk=1, V=1, gate="A")),
    Case("mamba1_mixed_T67_c64_H20_K4", dict(T=67, chunk=64, H=20, Hk=1, K=4, V=1, gate="A",
                                             strength="mixed")),
    Case("mamba1_strided_T33_c16_loss_on_state", dict(T=33, H=4, Hk=1, V=1, gate="A",
                                                      layout="strided"), loss_on=(1,)),
    # RG-LRU: K = V = 1, one gate per channel-head
    Case("rglru_T67_c16", dict(T=67, H=4, K=1, V=1)),
    Case("rglru_near0_T67_c16", dict(T=67, H=4, K=1, V=1, strength="near0")),
    Case("rglru_keydim_gate_T17_c16", dict(T=17, H=4, K=1, V=1, gate="vector")),
    Case("rglru_mixed_T64_c16_qk_ones", dict(T=64, H=4, Hk=1, K=1, V=1, strength="mixed",
                                             qk_ones=True)),
)

DELTA = _table(
    # DeltaNet: no decay
    Case("deltanet_T67_c64", dict(T=67, chunk=64)),
    Case("deltanet_T1_nostate", dict(T=1, state=False)),
    Case("deltanet_T64_c16_loss_on_o", dict(T=64), loss_on=(0,)),
    # Gated DeltaNet: one decay per head
    Case("gated_T67_c16", dict(T=67, decay="head")),
    Case("gated_near0_T17_c16_nostate", dict(T=17, decay="head", strength="near0",
                                             state=False)),
    Case("gated_near1_T64_c16_B3", dict(T=64, B=3, decay="head", strength="near1")),
    Case("gated_mixed_T33_c16_strided", dict(T=33, decay="head", strength="mixed",
                                             layout="strided")),
    Case("gated_zero_T67_c16", dict(T=67, decay="head", strength="zero")),
    # one decay per key channel
    Case("keydecay_T67_c16", dict(T=67, decay="key")),
    Case("keydecay_near0_T67_c64_nostate", dict(T=67, chunk=64, decay="key",
                                                strength="near0", state=False)),
    Case("keydecay_mixed_T17_c16", dict(T=17, decay="key", strength="mixed")),
    Case("bvec_keydecay_T67_c16", dict(T=67, form="bvec", decay="key")),
    # the generalised rule, a and b vectors: RWKV-7 (per-key decay), and per head / none
    Case("rwkv7_T67_c16", dict(T=67, form="dplr", decay="key")),
    Case("rwkv7_near0_T64_c64", dict(T=64, chunk=64, form="dplr", decay="key",
                                     strength="near0")),
    Case("rwkv7_T1", dict(T=1, form="dplr", decay="key")),
    Case("dplr_headdecay_mixed_T33_c16", dict(T=33, form="dplr", decay="head",
                                              strength="mixed")),
    Case("dplr_nodecay_T17_c16_loss_on_state", dict(T=17, form="dplr"), loss_on=(1,)),
)

ATTENTION = _table(
    Case("global_T67", dict(Tq=67)),
    Case("global_T1", dict(Tq=1)),
    Case("global_gqa_T64", dict(Tq=64, Hq=4, Hkv=2)),
    Case("global_mqa_T17_scale", dict(Tq=17, Hq=4, Hkv=1, scale=0.3)),
    Case("window5_T67", dict(Tq=67, window=5)),
    Case("window1_T17", dict(Tq=17, window=1)),
    Case("window100_T70", dict(Tq=70, window=100)),
    Case("window3_gqa_T67_strided", dict(Tq=67, Hq=4, Hkv=2, window=3, layout="strided")),
    Case("block16_T67", dict(Tq=67, block_size=16)),
    Case("block16_gqa_T64", dict(Tq=64, Hq=4, Hkv=1, block_size=16)),
    Case("block8_offset_T17", dict(Tq=17, Tk=20, q_pos0=40, k_pos0=37, block_size=8)),
    Case("global_tokens_w8_G3_gqa_T67", dict(Tq=67, Hq=4, Hkv=2, window=8, G=3)),
    Case("global_tokens_decode", dict(Tq=1, Tk=5, q_pos0=40, k_pos0=36, window=6, G=2,
                                      Hkv=1)),
    Case("decode_Tq1_Tk67", dict(Tq=1, Tk=67, q_pos0=66)),
    Case("decode_Tq5_Tk67_window9_gqa", dict(Tq=5, Tk=67, q_pos0=62, window=9, Hq=4, Hkv=2)),
    Case("cached_window5_T33", dict(Tq=33, Tk=37, q_pos0=40, k_pos0=36, window=5)),
    Case("queries_seeing_no_key", dict(Tq=8, k_pos0=4, B=3)),
)

CASES: dict[str, dict[str, Case]] = {
    "gated_linear_recurrence": GLR,
    "delta_rule": DELTA,
    "attention": ATTENTION,
}
GENERATORS = {
    "gated_linear_recurrence": glr_inputs,
    "delta_rule": delta_inputs,
    "attention": attention_inputs,
}


# --------------------------------------------------------------------------------------------
# Running a backend and comparing it with the reference
# --------------------------------------------------------------------------------------------
def _build(op_name: str, case: Case, dtype: torch.dtype, device: str):
    """(args, kwargs) of ``case`` in ``dtype`` on ``device`` (the same numbers every call)."""
    g = torch.Generator().manual_seed(_seed(op_name, case.name))
    args, kwargs = GENERATORS[op_name](g, dtype, **case.params)
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return tuple(map(move, args)), {n: move(t) for n, t in kwargs.items()}


def _arg_names(fn, n: int) -> list[str]:
    """Names of the first n positional parameters of fn (from its signature; arg<i> where it
    has none)."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"arg{i}" for i in range(n)]


def _leaves(args, kwargs, names):
    """The call with every floating tensor replaced by a fresh leaf requiring grad (same
    storage and strides), and the list of those leaves with their names."""
    named = []

    def leaf(name, t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().requires_grad_(True)
            named.append((name, t))
        return t

    args = tuple(leaf(n, t) for n, t in zip(names, args))
    kwargs = {n: leaf(n, t) for n, t in kwargs.items()}
    return args, kwargs, named


def _run(fn, args, kwargs, cotangents, loss_on, names=None):
    """fn(*args, **kwargs) and the gradients of every floating input (by the name ``names``
    gives its position, else fn's own) under the upstream gradients ``cotangents`` (a list,
    a function of the outputs in the loss giving one, or None: random) for the outputs in
    ``loss_on``."""
    args, kwargs, named = _leaves(args, kwargs, names or _arg_names(fn, len(args)))
    out = fn(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    used = tuple(range(len(outs))) if loss_on is None else loss_on
    if cotangents is None:
        cotangents = [torch.randn_like(outs[i]) for i in used]
    elif callable(cotangents):
        cotangents = cotangents([outs[i] for i in used])
    grads = torch.autograd.grad([outs[i] for i in used], [t for _, t in named],
                                grad_outputs=list(cotangents), allow_unused=True,
                                materialize_grads=True)
    return [o.detach() for o in outs], dict(zip([n for n, _ in named], grads))


@functools.lru_cache(maxsize=None)
def _reference(op_name: str, case_name: str, dtype: torch.dtype):
    """The reference's outputs and gradients, in float64 on the CPU, for the case's inputs in
    ``dtype`` (float32 inputs rounded first, then run in float64), and the upstream gradients
    (random, in ``dtype``) that produced them."""
    case = CASES[op_name][case_name]
    ref = ops()[op_name].get("reference")
    assert ref is not None, f"op '{op_name}' has no 'reference' backend to compare against"
    args, kwargs = _build(op_name, case, dtype, "cpu")
    up = lambda t: t.to(F64) if isinstance(t, torch.Tensor) else t  # noqa: E731
    args64, kwargs64 = tuple(map(up, args)), {n: up(t) for n, t in kwargs.items()}
    why = ref.refuses(args64, kwargs64)
    assert why is None, f"the reference of '{op_name}' refuses case {case_name}: {why}"
    g = torch.Generator().manual_seed(_seed(op_name, case.name, "cotangent"))
    cot = []

    def cotangents(used):        # random, rounded to dtype: the backend gets the same numbers
        cot.extend(torch.randn(o.shape, generator=g, dtype=F64).to(dtype) for o in used)
        return [c.to(F64) for c in cot]

    outs, grads = _run(ref.fn, args64, kwargs64, cotangents, case.loss_on,
                       _arg_names(ref.fn, len(args64)))
    for name, t in [(f"output {i}", o) for i, o in enumerate(outs)] + list(grads.items()):
        assert torch.isfinite(t).all(), f"reference {op_name} gives non-finite {name}"
    return outs, grads, cot


def _compare(what: str, got: torch.Tensor | None, want: torch.Tensor, dtype: torch.dtype,
             call_scale: float) -> str | None:
    """None when got matches want: same shape, the expected dtype, all finite, and
    max |got - want| <= TOL * max |want| (see FLOOR and NOISE for tensors without a usable
    scale of their own); else what is wrong. call_scale is the largest |entry| of all the
    reference's outputs and gradients."""
    if got is None:
        return f"{what}: missing (None)"
    if tuple(got.shape) != tuple(want.shape):
        return f"{what}: shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    if got.dtype != dtype:
        return f"{what}: dtype {got.dtype}, expected {dtype}"
    got = got.detach().to("cpu", F64)
    bad = ~torch.isfinite(got)
    if bad.any():
        return (f"{what}: {int(bad.sum())} of {got.numel()} entries non-finite (first at "
                f"{tuple(bad.nonzero()[0].tolist())}); NaN may mean the backend read memory it "
                f"never wrote (fresh allocations are NaN-filled here)")
    if not want.numel():
        return None
    diff = (got - want).abs()
    err, scale = diff.max().item(), want.abs().max().item()
    if scale == 0:
        bound = NOISE[dtype] * call_scale
        return None if err <= bound else (
            f"{what}: the reference is exactly 0 here, the backend gives up to {err:.3e} "
            f"(> {NOISE[dtype]:.1e} * {call_scale:.3e})")
    if err <= TOL[dtype] * max(scale, FLOOR[dtype]):
        return None
    at = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return (f"{what}: max |got - want| = {err:.3e} > {TOL[dtype]:g} * max |want| "
            f"({scale:.3e}); worst at {at}: got {got[at].item():.10g}, want "
            f"{want[at].item():.10g}; relative RMSE "
            f"{(diff.norm() / want.norm().clamp_min(1e-300)).item():.3e}")


def _pairs():
    """(op, backend, case, dtype, device) for every non-reference backend of every op, at
    collection time; an op without cases gets one entry that fails."""
    params = []
    for op_name, backends in sorted(ops().items()):
        for name in sorted(backends):
            if name == "reference":
                continue
            if op_name not in CASES:
                params.append(pytest.param(op_name, name, None, F64, "cpu",
                                           id=f"{op_name}-{name}-NO_INPUT_GENERATOR"))
                continue
            for case_name in CASES[op_name]:
                for dtype in DTYPES:
                    for device in DEVICES:
                        tag = f"{op_name}-{name}-{case_name}-{DTYPE_TAG[dtype]}"
                        params.append(pytest.param(
                            op_name, name, case_name, dtype, device,
                            id=tag + ("" if device == "cpu" else f"-{device}")))
    return params


def _no_generator(op_name: str) -> str:
    return (f"op '{op_name}' has no input generator in tests/ops/test_conformance.py: add a "
            f"generator to GENERATORS and a table of calls to CASES covering what the op "
            f"allows, so that each of its backends is checked against its reference")


def test_every_op_has_input_generators():
    """A newly registered op must come with input generators here (an op with only a
    reference has no pairs below, so this is where it fails)."""
    missing = [op_name for op_name in ops() if op_name not in CASES or op_name not in GENERATORS]
    assert not missing, "; ".join(_no_generator(op_name) for op_name in missing)
    for op_name in ops():
        assert "reference" in ops()[op_name], f"op '{op_name}' has no 'reference' backend"


@pytest.mark.parametrize("op_name,backend_name,case_name,dtype,device", _pairs())
def test_backend_matches_reference(op_name, backend_name, case_name, dtype, device):
    if op_name not in CASES or case_name is None:
        pytest.fail(_no_generator(op_name))
    backend = ops()[op_name][backend_name]
    why = backend.available()
    if why is not None:
        pytest.skip(f"backend '{backend_name}' is not available here: {why}")
    if device not in backend.devices:
        pytest.skip(f"backend '{backend_name}' runs on {sorted(backend.devices)}, not {device}")
    if dtype not in backend.dtypes:
        pytest.skip(f"backend '{backend_name}' does not declare {dtype}")
    case = CASES[op_name][case_name]
    args, kwargs = _build(op_name, case, dtype, device)
    why = backend.refuses(args, kwargs)
    if why is not None:
        pytest.skip(f"backend '{backend_name}' refuses this call: {why}")
    want_outs, want_grads, cot = _reference(op_name, case_name, dtype)
    before = [(n, t.clone()) for n, t in list(enumerate(args)) + list(kwargs.items())
              if isinstance(t, torch.Tensor)]
    # the reference's parameter names: every backend of an op shares its signature
    outs, grads = _run(backend.fn, args, kwargs, [c.to(device) for c in cot], case.loss_on,
                       _arg_names(ops()[op_name]["reference"].fn, len(args)))
    where = f"{op_name}/{backend_name} {case_name} {DTYPE_TAG[dtype]}"
    assert len(outs) == len(want_outs), \
        f"{where}: {len(outs)} outputs, the reference returns {len(want_outs)}"
    call_scale = max([t.abs().max().item() for t in list(want_outs) + list(want_grads.values())
                      if t.numel()] + [0.0])
    names = ["output", "final state"] + [f"output {i}" for i in range(2, len(outs))]
    problems = [_compare(f"{name}", got, want, dtype, call_scale)
                for name, got, want in zip(names, outs, want_outs)]
    problems += [_compare(f"gradient of {name}", grads[name], want, dtype, call_scale)
                 for name, want in want_grads.items()]
    for n, t in before:
        now = args[n] if isinstance(n, int) else kwargs[n]
        if not (torch.equal(now.isnan(), t.isnan())
                and torch.equal(now.nan_to_num(), t.nan_to_num())):
            problems.append(f"input {n} was modified in place")
    problems = [p for p in problems if p]
    if problems:
        pytest.fail(f"{where} differs from the reference:\n  " + "\n  ".join(problems))
