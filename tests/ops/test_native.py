"""The compiled ``native`` backend of gated_linear_recurrence (V = 1: Mamba-1, RG-LRU): equal to
the reference on outputs, final state and every gradient (float64 to 1e-10, float32 to 1e-4)
over full and partial head blocks, K above and below the lane count, T = 1 and T across the
backward's segments, extreme gates; its dispatch, its build cache, and a clear reason whenever
it cannot be built."""
import stat

import pytest
import torch

from blocks.ops.recurrence import native
from blocks.ops.recurrence.reference import recurrence_reference
from composer.core import kernels
from composer.core.errors import HycompError
from composer.core.kernels import op, use_kernels
from composer.core.registry import resolve_backend

from helpers import rel_err
from scan_helpers import call, grads, matches_reference, saved_bytes, scan_inputs

# skipped only where no C compiler is installed at all; with one, a failed build fails
pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler here")

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
CK = native.CHECKPOINT


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """native with nothing loaded and an empty build cache, and the op dispatch's cached
    backend lists dropped (all restored afterwards)."""
    monkeypatch.setenv("HYCOMP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_why", None)
    monkeypatch.setattr(native, "_tried", False)
    kernels._candidates.cache_clear()
    yield tmp_path
    kernels._candidates.cache_clear()


def test_builds_here():
    """With a C compiler present (CI has one) the backend builds and loads."""
    assert native.unavailable() is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 15, CK, CK + 1, 2 * CK + 3])
@pytest.mark.parametrize("gate", ["normal", "near0", "near1"])
@pytest.mark.parametrize("form", ["factored", "scalar", "none"])
def test_matches_reference(dtype, T, gate, form):
    """Mamba-1's layout (one q/k group), 40 heads: blocks of 16, 16 and 8 heads (full and
    partial), K = 16 (the lane-sum tree for dq and dk)."""
    args = scan_inputs(2, T, 1, 40, 16, dtype, gate, True, form)
    matches_reference(call(native.recurrence_native), args, T, TOL[dtype])


@pytest.mark.parametrize("Hk,R,K", [(2, 20, 4), (3, 17, 1), (1, 33, 20), (2, 32, 32),
                                    (1, 3, 5)])
@pytest.mark.parametrize("form", ["factored", "scalar"])
@pytest.mark.parametrize("with_state", [True, False])
def test_shapes_match_reference(Hk, R, K, form, with_state):
    """Several q/k groups, K not a multiple of the lanes (20: a tree then one lane sum per k),
    two whole trees (32), RG-LRU's K = 1, fewer heads than lanes."""
    args = scan_inputs(2, 2 * CK + 5, Hk, R, K, torch.float64, "normal", with_state, form)
    matches_reference(call(native.recurrence_native), args, K + R)


def test_exact_zero_gates_and_long_sequence():
    """Gates that underflow to exactly 0 (log gate -1e4) and a long sequence in float32."""
    args = scan_inputs(1, 40, 1, 24, 1, torch.float64, "zero", True, "scalar")
    matches_reference(call(native.recurrence_native), args, 1)
    args = scan_inputs(1, 1500, 1, 20, 16, torch.float32, "normal", True, "factored")
    matches_reference(call(native.recurrence_native), args, 2, 1e-4)


@pytest.mark.parametrize("used", ["output", "state"])
def test_gradients_with_one_output_unused(used):
    """Only o (training) or only the final state feeds the loss: the other's gradient comes
    as None (no zero tensor) and the backward skips it, equal to the reference."""
    args = scan_inputs(2, 2 * CK + 7, 1, 20, 16, torch.float64)
    grads = []
    for fn in (native.recurrence_native, recurrence_reference):
        leaves = [a.clone().requires_grad_(True) for a in args]
        o, S = call(fn)(*leaves)
        (o.square().sum() if used == "output" else S.square().sum()).backward()
        grads.append([x.grad for x in leaves])
    for got, ref in zip(*grads):
        if ref is None:                     # q does not reach the final state
            assert not got.any()
        else:
            assert rel_err(got, ref) < 1e-10


def test_state_splits_sequence():
    """forward(x[:a]) then forward(x[a:], state) equals forward(x), a inside a segment."""
    q, k, v, dt, s0, A = scan_inputs(2, 150, 1, 18, 16, torch.float64)
    o, S = native.recurrence_native(q, k, v, dt, s0, A=A)
    a = CK + 9
    oa, Sa = native.recurrence_native(q[:, :a], k[:, :a], v[:, :a], dt[:, :a], s0, A=A)
    ob, Sb = native.recurrence_native(q[:, a:], k[:, a:], v[:, a:], dt[:, a:], Sa, A=A)
    assert rel_err(torch.cat([oa, ob], 1), o) < 1e-12 and rel_err(Sb, S) < 1e-12


def test_bf16_inputs_run_in_float32():
    """bfloat16 inputs: computed in float32 and returned in bfloat16 (the reference on the
    same values in float32, rounded once)."""
    args = scan_inputs(2, 70, 1, 20, 8, torch.float32)
    lo = [None if a is None else a.to(torch.bfloat16) for a in args]
    o, S = call(native.recurrence_native)(*lo)
    o_ref, S_ref = call(recurrence_reference)(*[None if a is None else a.float() for a in lo])
    assert o.dtype == S.dtype == torch.bfloat16
    assert rel_err(o.float(), o_ref) < 1e-2 and rel_err(S.float(), S_ref) < 1e-2


def test_same_result_on_any_thread_count(monkeypatch):
    """Each block of heads runs on one thread and the per-block sums are added by torch in a
    fixed order: one thread, two OpenMP threads and two Python threads (the path of a build
    without OpenMP) give the same numbers, bit for bit."""
    args = scan_inputs(2, 90, 2, 24, 16, torch.float32)
    before = torch.get_num_threads()
    res = []
    try:
        for n, openmp in ((1, True), (2, True), (2, False)):
            torch.set_num_threads(n)
            if not openmp:
                monkeypatch.setattr(native._lib, "scan_openmp", lambda: 0)
            o, S = call(native.recurrence_native)(*args)
            res.append([o, S] + grads(call(native.recurrence_native), args, 3))
    finally:
        torch.set_num_threads(before)
    for other in res[1:]:
        for a, b in zip(res[0], other):
            assert a is None and b is None or torch.equal(a, b)


def test_keeps_inputs_and_one_state_per_segment():
    """The backward remakes a segment's states from the one kept at its start: autograd
    holds the inputs plus T / 64 states, not the T x H x K that ``scan`` keeps."""
    T, H, K = 300, 48, 16
    args = scan_inputs(1, T, 1, H, K, torch.float32)
    inputs = sum(a.numel() * a.element_size() for a in args if a is not None)
    kept = -(-T // CK) * H * K * 4
    assert saved_bytes(call(native.recurrence_native), args) <= 2 * inputs + kept
    assert kept < T * H * K * 4 / 50


def test_auto_picks_native_where_it_applies():
    """auto: native for V = 1 with gates per head or dt * A; scan for gates per key dim;
    chunked for V > 1. Asking for native with V > 1 says what it handles."""
    cpu = torch.device("cpu")

    def pick(args, kw=None):
        return resolve_backend("gated_linear_recurrence", "auto", cpu, torch.float32,
                               (args, kw or {})).name

    q, k, v, dt, s0, A = scan_inputs(1, 9, 1, 4, 3, torch.float32)
    assert pick((q, k, v, dt, s0), {"A": A}) == "native"
    vec = scan_inputs(1, 9, 1, 4, 3, torch.float32, form="vector")
    assert pick(vec[:5]) == "scan"
    wide = (q, k, torch.randn(1, 9, 4, 2), dt)
    assert pick(wide) == "chunked"
    with use_kernels({"gated_linear_recurrence": "native"}):
        with pytest.raises(HycompError) as e:
            op("gated_linear_recurrence")(*wide)
    assert "V = 1" in str(e.value)


def test_switched_off(fresh, monkeypatch):
    """HYCOMP_NATIVE=0: unavailable, auto falls back to scan, and naming it is a clear
    error saying why and how to get the fallback."""
    monkeypatch.setenv("HYCOMP_NATIVE", "0")
    assert "HYCOMP_NATIVE=0" in native.unavailable()
    q, k, v, dt, s0, A = scan_inputs(1, 9, 1, 4, 3, torch.float32)
    assert resolve_backend("gated_linear_recurrence", "auto", torch.device("cpu"),
                           torch.float32, ((q, k, v, dt, s0), {"A": A})).name == "scan"
    with use_kernels({"gated_linear_recurrence": "native"}):
        with pytest.raises(HycompError) as e:
            op("gated_linear_recurrence")(q, k, v, dt, s0, A=A)
    msg = str(e.value)
    assert "not available" in msg and "HYCOMP_NATIVE=0" in msg and "=auto" in msg


def test_no_compiler_is_a_clear_reason(fresh, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    why = native.unavailable()
    assert "CC=/nonexistent/cc is not an executable" in why
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.delenv("CC")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    why = native.unavailable()
    assert "no C compiler" in why and "install gcc" in why


def test_failing_compiler_reports_its_words(fresh, monkeypatch, tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\n"
                    "echo 'fakecc: cannot build this today' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(fake))
    why = native.unavailable()
    assert "could not build" in why and "cannot build this today" in why
    assert not list(fresh.glob("native/*.so"))          # no half-built file left behind


def test_unwritable_cache_is_a_clear_reason(fresh, monkeypatch):
    blocker = fresh / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HYCOMP_CACHE_DIR", str(blocker))
    why = native.unavailable()
    assert "cannot write the build cache" in why and "HYCOMP_CACHE_DIR" in why


def test_build_is_cached(fresh, monkeypatch):
    """A build goes into the cache and the next one (a new process) finds it there without
    compiling; a damaged cached file is built again before loading. (Checked before this
    process loads the file: a loaded library is never rewritten in place, only replaced.)"""
    calls = []
    real_run = native.subprocess.run

    def run(cmd, *a, **kw):
        if "-shared" in cmd:
            calls.append(cmd)
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(native.subprocess, "run", run)
    path = native._build()
    first = len(calls)                  # more than one where a flag set is refused
    assert first >= 1 and path.parent == fresh / "native"
    assert native._build() == path and len(calls) == first
    path.unlink()
    path.write_bytes(b"not a shared library")
    assert native.unavailable() is None and len(calls) > first
    q, k, v, dt, s0, A = scan_inputs(1, 20, 1, 5, 3, torch.float64)
    o, S = native.recurrence_native(q, k, v, dt, s0, A=A)
    o2, S2 = recurrence_reference(q, k, v, dt, s0, A=A)
    assert rel_err(o, o2) < 1e-10 and rel_err(S, S2) < 1e-10


def test_empty_sequence_passes_the_state_through():
    q, k, v, dt, s0, A = scan_inputs(2, 5, 1, 6, 4, torch.float32)
    o, S = native.recurrence_native(q[:, :0], k[:, :0], v[:, :0], dt[:, :0], s0, A=A)
    assert o.shape == (2, 0, 6, 1) and torch.equal(S, s0)
