"""The ``step`` backends (one decode step, T = 1) of ``gated_linear_recurrence`` and
``delta_rule``: ``auto`` picks them for T = 1 only; a decode loop through them with the state
carried from step to step equals the reference over the whole sequence; at T = 1 their
gradients equal the reference's for every form (the conformance table has T = 1 cases for
only some forms); dtypes follow the other backends."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from composer.core.errors import HycompError
from composer.core.kernels import op, use_kernels
from composer.core.registry import ops, resolve_backend

GLR, DELTA = "gated_linear_recurrence", "delta_rule"
CPU = torch.device("cpu")
GLR_FORMS = ["none", "scalar", "vector", "A"]
DELTA_FORMS = ["deltanet", "gated_deltanet", "rwkv7", "bvec_headdecay"]


def backend(op_name: str, name: str):
    return ops()[op_name][name].fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (NaN fails)."""
    assert torch.isfinite(a).all(), "non-finite entries"
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def glr_call(form, B=2, T=9, H=4, Hk=2, K=8, V=5, dtype=torch.float32, state=True, seed=0):
    """(args, kwargs) of gated_linear_recurrence: fresh random inputs, gates -softplus(randn)
    (never 0); ``A`` is Mamba-1's factored gate, dt > 0 with A (H, K) < 0."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)   # noqa: E731
    q, k, v = r(B, T, Hk, K), r(B, T, Hk, K) / K ** 0.5, r(B, T, H, V)
    kwargs = {}
    if form == "none":
        log_g = None
    elif form == "scalar":
        log_g = -F.softplus(r(B, T, H))
    elif form == "vector":
        log_g = -F.softplus(r(B, T, H, K))
    elif form == "A":
        log_g = F.softplus(r(B, T, H))                                  # dt
        kwargs["A"] = (-F.softplus(r(H, K)) - 0.1).to(dtype)
    else:
        raise ValueError(form)
    s0 = r(B, H, K, V) if state else None
    cast = lambda t: None if t is None else t.to(dtype)                 # noqa: E731
    return tuple(map(cast, (q, k, v, log_g, s0))), kwargs


def delta_call(form, B=2, T=9, H=3, K=8, V=5, dtype=torch.float32, state=True, seed=0):
    """(args, kwargs) of delta_rule shaped as its models call it: DeltaNet (v -> beta v,
    b = -beta, no decay), Gated DeltaNet (b = -alpha beta, log alpha per head), RWKV-7
    (a = -kappa, b = kappa * a_icl, log w per key channel) and b a vector with a decay per
    head."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)   # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)    # noqa: E731
    q, v = r(B, T, H, K) / K ** 0.5, r(B, T, H, V)
    k = F.normalize(r(B, T, H, K), dim=-1)
    beta = u(B, T, H)
    kwargs = {}
    if form == "deltanet":
        v, b, log_w = v * beta[..., None], -beta, None
    elif form == "gated_deltanet":
        log_w = -F.softplus(r(B, T, H))
        v, b = v * beta[..., None], -beta * log_w.exp()
    elif form == "rwkv7":
        kappa = F.normalize(r(B, T, H, K), dim=-1)
        b, log_w = kappa * u(B, T, H, K), -F.softplus(r(B, T, H, K))
        kwargs["a"] = (-kappa).to(dtype)
    elif form == "bvec_headdecay":
        b, log_w = -u(B, T, H, K) * k, -F.softplus(r(B, T, H))
    else:
        raise ValueError(form)
    s0 = r(B, H, K, V) if state else None
    cast = lambda t: None if t is None else t.to(dtype)                 # noqa: E731
    return tuple(map(cast, (q, k, v, b, log_w, s0))), kwargs


def token(x, t):
    """Position t of a (B, T, ...) tensor as a T = 1 slice (None stays None)."""
    return None if x is None else x[:, t:t + 1]


def pick(op_name, args, kwargs, dtype=torch.float32):
    return resolve_backend(op_name, "auto", CPU, dtype, (args, kwargs)).name


def test_auto_picks_step_for_one_token_only():
    for form in GLR_FORMS:
        args, kw = glr_call(form, T=1)
        assert pick(GLR, args, kw) == "step", form
        args, kw = glr_call(form, T=2)
        assert pick(GLR, args, kw) != "step", form
    # V = 1 (Mamba-1, RG-LRU): step beats native and scan at T = 1 too, not beyond
    args, kw = glr_call("A", T=1, Hk=1, V=1)
    assert pick(GLR, args, kw) == "step"
    args, kw = glr_call("A", T=5, Hk=1, V=1)
    assert pick(GLR, args, kw) in ("native", "scan")
    for form in DELTA_FORMS:
        args, kw = delta_call(form, T=1)
        assert pick(DELTA, args, kw) == "step", form
        args, kw = delta_call(form, T=3)
        assert pick(DELTA, args, kw) == "chunked", form
    # without a call to look at: the best backend taking every shape, as before
    assert resolve_backend(GLR, "auto", CPU, torch.float32).name == "chunked"
    assert resolve_backend(DELTA, "auto", CPU, torch.float32).name == "chunked"


def test_step_by_name_refuses_longer_calls():
    args, kw = glr_call("scalar", T=3)
    with use_kernels({GLR: "step"}):
        with pytest.raises(HycompError) as e:
            op(GLR)(*args, **kw)
    assert "T = 1" in str(e.value) and "T = 3" in str(e.value)
    args, kw = delta_call("deltanet", T=3)
    with use_kernels({DELTA: "step"}):
        with pytest.raises(HycompError) as e:
            op(DELTA)(*args, **kw)
    assert "T = 1" in str(e.value)


def decode(op_name, args, kwargs, per_token):
    """Run ``step`` one token at a time over the whole call, carrying the state; returns the
    outputs concatenated over time and the final state. ``per_token``: which positional
    arguments and keywords have a time dim."""
    step = backend(op_name, "step")
    T = args[0].shape[1]
    state, outs = args[-1], []
    for t in range(T):
        a = tuple(token(x, t) if i in per_token else x for i, x in enumerate(args[:-1]))
        kw = {n: token(x, t) if n in per_token else x for n, x in kwargs.items()}
        o, state = step(*a, state, **kw)
        assert o.shape[1] == 1
        outs.append(o)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("initial", ["state", "none"])
@pytest.mark.parametrize("form,shape", [(f, {}) for f in GLR_FORMS] + [
    ("A", dict(H=4, Hk=1, V=1)),                   # Mamba-1: one head per channel, V = 1
    ("scalar", dict(H=4, Hk=1, K=1, V=1)),         # RG-LRU: K = V = 1
    ("scalar", dict(H=4, Hk=4))])                  # q, k per head
def test_recurrence_decode_loop_equals_reference(form, shape, initial):
    """9 decode steps (batch 2, Hk < H unless given), f32: outputs and the final state equal
    the reference over the whole sequence to 1e-5 relative."""
    args, kw = glr_call(form, T=9, state=initial == "state", seed=11, **shape)
    o, S = decode(GLR, args, kw, per_token={0, 1, 2, 3})
    o_ref, S_ref = backend(GLR, "reference")(*args, **kw)
    assert o.dtype == o_ref.dtype and S.dtype == S_ref.dtype
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("initial", ["state", "none"])
@pytest.mark.parametrize("form", DELTA_FORMS)
def test_delta_decode_loop_equals_reference(form, initial):
    """The same for delta_rule shaped as DeltaNet, Gated DeltaNet and RWKV-7 call it."""
    args, kw = delta_call(form, T=9, state=initial == "state", seed=12)
    o, S = decode(DELTA, args, kw, per_token={0, 1, 2, 3, 4, "a"})
    o_ref, S_ref = backend(DELTA, "reference")(*args, **kw)
    assert o.dtype == o_ref.dtype and S.dtype == S_ref.dtype
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


def grads_of(fn, args, kwargs, seed=3):
    """fn's outputs and the gradients of every floating input (zeros where unused) under
    fixed random upstream gradients on both outputs."""
    args = tuple(None if x is None else x.detach().requires_grad_() for x in args)
    kwargs = {n: x.detach().requires_grad_() for n, x in kwargs.items()}
    outs = fn(*args, **kwargs)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    leaves = [x for x in list(args) + list(kwargs.values()) if x is not None]
    grads = torch.autograd.grad(outs, leaves, cot, allow_unused=True, materialize_grads=True)
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("state", [True, False])
@pytest.mark.parametrize("form,shape", [(f, {}) for f in GLR_FORMS] + [
    ("A", dict(H=4, Hk=1, V=1)), ("vector", dict(H=4, Hk=4))])
def test_recurrence_step_gradients(form, shape, state):
    """T = 1 in float64: outputs, final state and every input's gradient equal the
    reference's to 1e-12."""
    args, kw = glr_call(form, T=1, state=state, dtype=torch.float64, seed=5, **shape)
    got = grads_of(backend(GLR, "step"), args, kw)
    want = grads_of(backend(GLR, "reference"), args, kw)
    for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a - b).abs().max() <= 1e-12 * max(b.abs().max().item(), 1.0)


@pytest.mark.parametrize("state", [True, False])
@pytest.mark.parametrize("form", DELTA_FORMS)
def test_delta_step_gradients(form, state):
    args, kw = delta_call(form, T=1, state=state, dtype=torch.float64, seed=6)
    got = grads_of(backend(DELTA, "step"), args, kw)
    want = grads_of(backend(DELTA, "reference"), args, kw)
    for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a - b).abs().max() <= 1e-12 * max(b.abs().max().item(), 1.0)


def test_low_precision_inputs_and_autocast():
    """bf16 inputs: computed in float32, o and the state returned in bf16 (q's dtype, as the
    op says and ``chunked`` does); under a bf16 autocast the products stay float32 (the same
    numbers as without); inputs are never modified."""
    for op_name, (args, kw) in ((GLR, glr_call("vector", T=1)),
                                (DELTA, delta_call("gated_deltanet", T=1))):
        bf = tuple(None if x is None else x.to(torch.bfloat16) for x in args)
        kwb = {n: x.to(torch.bfloat16) for n, x in kw.items()}
        before = [x.clone() for x in bf if x is not None]
        o, S = backend(op_name, "step")(*bf, **kwb)
        assert o.dtype == S.dtype == torch.bfloat16
        assert [t.dtype for t in backend(op_name, "chunked")(*bf, **kwb)] == [torch.bfloat16] * 2
        o_ref, S_ref = backend(op_name, "reference")(*bf, **kwb)
        assert rel(o.float(), o_ref.float()) < 1e-2 and rel(S.float(), S_ref.float()) < 1e-2
        assert all(torch.equal(x, y) for x, y in zip(before, [x for x in bf if x is not None]))
        plain = backend(op_name, "step")(*args, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = backend(op_name, "step")(*args, **kw)
        for a, b in zip(auto, plain):
            assert a.dtype == torch.float32 and torch.equal(a, b)


def test_op_call_at_one_token_goes_through_step():
    """Through ``op(...)`` under ``auto`` a T = 1 call runs ``step`` and matches the
    reference; non-contiguous inputs (a batch-major view of a time-major buffer) work."""
    args, kw = glr_call("scalar", T=1, seed=9)
    strided = tuple(x.transpose(0, 1).contiguous().transpose(0, 1) for x in args)
    o, S = op(GLR)(*strided, **kw)
    o_ref, S_ref = backend(GLR, "reference")(*args, **kw)
    assert rel(o, o_ref) < 1e-6 and rel(S, S_ref) < 1e-6
    args, kw = delta_call("rwkv7", T=1, seed=9)
    o, S = op(DELTA)(*args, **kw)
    o_ref, S_ref = backend(DELTA, "reference")(*args, **kw)
    assert rel(o, o_ref) < 1e-6 and rel(S, S_ref) < 1e-6
