"""``delta_rule``'s chunked backend where a chunk decays far: an early decay near 0 makes every
later prefix sum of the log decays large (~-1e4), and decays between later positions taken as
differences of float32 prefix sums would lose all their digits (ulp(1e4) ~ 1e-3). Outputs,
final states and every gradient must equal the float64 reference (run on the same
float32-rounded inputs) to float32 precision, for per-head and per-key decays, the plain and
the generalised (a, b) forms, and log decays down to -1e30 and -inf."""
import math

import pytest
import torch
import torch.nn.functional as F

import blocks.ops.delta.chunked as chunked
from blocks.ops.delta.chunked import delta_chunked
from blocks.ops.delta.reference import delta_reference

F32, F64 = torch.float32, torch.float64
TOL = {F32: 1e-4, F64: 1e-10}
"""Largest max |got - want| / max |want| per tensor."""
FORMS = {
    "gated_head": ("plain", "head"),       # Gated DeltaNet: the hand-written plain form
    "plain_key": ("plain", "key"),         # plain rule, one decay per key channel
    "rwkv7_key": ("dplr", "key"),          # a, b vectors (RWKV-7)
    "dplr_head": ("dplr", "head"),         # a, b vectors, one decay per head
}


def _inputs(form, B, T, H, K, V, seed, log_w):
    """(q, k, v, b, log_w, state, a) in float64, unit keys; ``log_w(shape, g)`` makes the log
    decays for (B, T, H) or (B, T, H, K)."""
    rule, decay = FORMS[form]
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)      # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=F64)       # noqa: E731
    q = r(B, T, H, K) / math.sqrt(K)
    k = F.normalize(r(B, T, H, K), dim=-1)
    v = r(B, T, H, V)
    s0 = r(B, H, K, V)
    lw = log_w((B, T, H) if decay == "head" else (B, T, H, K), g)
    if rule == "plain":
        return q, k, v, -(0.05 + 0.95 * u(B, T, H)), lw, s0, None
    kappa = F.normalize(r(B, T, H, K), dim=-1)
    return q, k, v, kappa * (0.05 + 0.95 * u(B, T, H, K)), lw, s0, -kappa


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite entries"
    return ((got.to(F64) - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _check(args, chunk, dtype=F32, tol=None):
    """Run the reference (float64, on the inputs rounded to ``dtype``) and the chunked backend
    (in ``dtype``) under the same random cotangents of output and final state; assert every
    tensor (output, state, the gradient of each input) matches. Returns the worst error."""
    args = [None if x is None else x.detach().to(dtype) for x in args]
    B, T, H, V = args[2].shape
    g = torch.Generator().manual_seed(1000 + T)
    w_o = torch.randn(B, T, H, V, generator=g, dtype=F64)
    w_s = torch.randn(args[5].shape, generator=g, dtype=F64)
    res = []
    for fn, dt in ((delta_reference, F64), (lambda *x, a: delta_chunked(*x, a=a,
                                                                       chunk_size=chunk), dtype)):
        leaves = [None if x is None else x.to(dt, copy=True).requires_grad_(True)
                  for x in args]                            # fresh leaves for each run
        o, S = fn(*leaves[:6], a=leaves[6])
        assert o.dtype == dt and S.dtype == dt
        ((o * w_o.to(dt)).sum() + (S * w_s.to(dt)).sum()).backward()
        res.append([o.detach(), S.detach()] + [x.grad for x in leaves if x is not None])
    names = ["output", "final state", "dq", "dk", "dv", "db", "dlog_w", "dstate", "da"]
    worst = 0.0
    for name, want, got in zip(names, *res):
        assert torch.isfinite(want).all(), f"reference {name} not finite"
        err = _max_rel(got, want)
        assert err <= (TOL[dtype] if tol is None else tol), f"{name}: {err:.3e}"
        worst = max(worst, err)
    return worst


def _spiked(at, value, base=-0.1):
    """log decays ``base`` everywhere but ``value`` at the positions ``at``."""
    def make(shape, g):
        lw = torch.full(shape, base, dtype=F64)
        lw[:, at] = value
        return lw
    return make


@pytest.mark.parametrize("spike", [-300.0, -1e4, -1e30, -math.inf])
@pytest.mark.parametrize("form", list(FORMS))
def test_minimal_reproduction(form, spike):
    """B = H = 1, T = 32, chunk 16, log w = -0.1 but at t = 3: every later position of the
    first chunk has a prefix sum near the spike's."""
    args = _inputs(form, 1, 32, 1, 8, 8, seed=3, log_w=_spiked([3], spike))
    _check(args, chunk=16)


@pytest.mark.parametrize("spike", [-1e4, -math.inf])
@pytest.mark.parametrize("form", list(FORMS))
def test_minimal_reproduction_float64(form, spike):
    """The same in float64: -inf (and anything past exp's range) neither swamps the prefix
    sums nor gives NaN."""
    args = _inputs(form, 1, 32, 1, 8, 8, seed=4, log_w=_spiked([3], spike))
    _check(args, chunk=16, dtype=F64)


def _random_spikes(at, base_scale=0.5):
    """log decays -U(0, base_scale), and at the positions ``at`` -1e4 (1 + U) in a random half
    of the (batch, head[, key]) entries (the others keep theirs)."""
    def make(shape, g):
        lw = -base_scale * torch.rand(shape, generator=g, dtype=F64)
        spike = -1e4 * (1 + torch.rand(shape, generator=g, dtype=F64))
        pick = torch.rand(shape, generator=g, dtype=F64) < 0.5
        pick[:, [t for t in range(shape[1]) if t not in at]] = False
        pick[0, at] = True                              # batch 0 takes every spike
        return torch.where(pick, spike, lw)
    return make


@pytest.mark.parametrize("B,T,chunk,at", [
    (1, 1, 16, [0]),                      # T = 1
    (2, 37, 16, [0, 16, 31]),             # first and last position of a chunk; T % C != 0
    (3, 50, 16, [15, 32, 47]),            # last of chunk 0, first of chunk 2, the last token
    (2, 70, 64, [5, 63]),                 # chunk 64 (per key: four sub-chunks of 16)
])
@pytest.mark.parametrize("form", list(FORMS))
def test_strong_decays_at_chunk_edges(form, B, T, chunk, at):
    args = _inputs(form, B, T, 2, 8, 6, seed=T + chunk, log_w=_random_spikes(at))
    _check(args, chunk=chunk)


def _mixed(shape, g):
    """Per entry one of: 0, -1e-6 U, -U, -30 - 20 U, -1e4 (1 + U), -1e30, -inf."""
    u = torch.rand(shape, generator=g, dtype=F64)
    forms = [torch.zeros_like(u), -1e-6 * u, -u, -30 - 20 * u, -1e4 * (1 + u),
             torch.full_like(u, -1e30), torch.full_like(u, -math.inf)]
    pick = torch.randint(0, len(forms), shape, generator=g)
    return torch.stack(forms, -1).gather(-1, pick[..., None])[..., 0]


@pytest.mark.parametrize("T,chunk", [(33, 16), (67, 64)])
@pytest.mark.parametrize("form", list(FORMS))
def test_mixed_decays(form, T, chunk):
    args = _inputs(form, 2, T, 2, 8, 8, seed=7 * T, log_w=_mixed)
    _check(args, chunk=chunk)


def _spy(monkeypatch):
    """Record, per call of _prefix_sums, whether it returned float64 prefix sums."""
    seen = []
    orig = chunked._prefix_sums

    def spy(lw):
        out = orig(lw)
        seen.append(out[1].dtype == F64)
        return out
    monkeypatch.setattr(chunked, "_prefix_sums", spy)
    return seen


def _moderate(shape, g):
    """log decays -2 U: chunks of 64 decay about 64 (past PREFIX_SPAN), sub-chunks of 16
    about 16 (the per-key factorised form still takes them)."""
    return -2.0 * torch.rand(shape, generator=g, dtype=F64)


@pytest.mark.parametrize("form", list(FORMS))
def test_both_prefix_sum_forms_match_the_reference(monkeypatch, form):
    """Typical decays take float32 prefix sums, far-decaying chunks float64 ones; each form,
    forced by the threshold either way, matches the reference where its precision allows."""
    seen = _spy(monkeypatch)
    typical = _inputs(form, 2, 45, 2, 8, 6, seed=11, log_w=lambda s, g: -0.1 * torch.rand(
        s, generator=g, dtype=F64))
    strong = _inputs(form, 2, 45, 2, 8, 6, seed=12, log_w=_random_spikes([3, 20]))
    moderate = _inputs(form, 2, 70, 2, 8, 6, seed=13, log_w=_moderate)
    _check(typical, chunk=16)
    assert seen == [False]
    _check(strong, chunk=16)
    assert seen[-1:] == [True]
    _check(moderate, chunk=64)
    assert seen[-1:] == [True]
    monkeypatch.setattr(chunked, "PREFIX_SPAN", -1.0)       # every call: float64
    for args, chunk in ((typical, 16), (typical, 64), (moderate, 64)):
        _check(args, chunk=chunk)
        _check(args, chunk=chunk, dtype=F64)
        assert seen[-1:] == [True]
    monkeypatch.setattr(chunked, "PREFIX_SPAN", math.inf)   # every finite call: float32
    _check(typical, chunk=16)
    _check(typical, chunk=16, dtype=F64)
    _check(moderate, chunk=64)
    assert seen[-1:] == [False]


@pytest.mark.parametrize("form", ["gated_head", "rwkv7_key"])
def test_float32_prefix_sums_lose_the_digits(monkeypatch, form):
    """The root cause, kept visible: forcing float32 prefix sums on the minimal reproduction
    (spike -1e4) puts errors far past float32 rounding, which the float64 ones remove."""
    args = _inputs(form, 1, 32, 1, 8, 8, seed=3, log_w=_spiked([3], -1e4))
    assert _check(args, chunk=16) < 1e-5
    monkeypatch.setattr(chunked, "PREFIX_SPAN", 1e30)
    with pytest.raises(AssertionError):
        _check(args, chunk=16)
