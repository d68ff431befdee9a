"""``native``: the diagonal scan (V = 1: Mamba-1, RG-LRU) as compiled C, for CPUs.

The pure-PyTorch ``scan`` backend is bound by what eager PyTorch can do per Python-level step
(many elementwise passes over cache-sized tensors, thousands of aten calls per layer). This
backend is the loop nest one would write by hand (``diag_scan.c``): each block of 16 heads
runs the whole sequence with its (K, 16) state in registers, exp and the reductions over K
are 16-wide vector code, and the backward remakes each 64-step
segment's states from one kept state instead of keeping all T x H x K of them (Mamba-1 at
T=16384, d_inner 512, d_state 16: 8 MiB kept per layer against ``scan``'s 512 MiB).

The C file is built on first use with the system's C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``) into ``$HYCOMP_CACHE_DIR/native`` (default ``~/.cache/hycomp/native``), keyed by
the source, the compiler and this CPU's flags, so later processes load it without building.
It has no PyTorch headers, so a build takes seconds. A call runs its blocks on
``torch.get_num_threads()`` threads of the OpenMP runtime PyTorch already runs on (its
libgomp; a build without OpenMP runs them on Python threads instead, ctypes letting go of the
GIL): threads of our own would compete with PyTorch's, which spin for a while after each of
its ops.

Without a compiler (or with ``HYCOMP_NATIVE=0``) the backend reports itself unavailable and
``auto`` takes ``scan``; ``hycomp kernels`` shows why. Numbers: float32 and float64 as they are
(float64 to 1e-10 of ``reference`` in the tests), bfloat16 and float16 computed in float32.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from blocks.ops.recurrence import OP
from composer.core.block import accum_dtype, no_autocast
from composer.core.registry import register_backend

SOURCE = Path(__file__).with_name("diag_scan.c")
CHECKPOINT = 64
"""Steps per kept state: the backward remakes one segment of this many steps at a time (its
gates and states, (CHECKPOINT + 1) x K x 16 numbers per block, stay in cache)."""

_lib: ctypes.CDLL | None = None
_why: str | None = None
_tried = False
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def cache_dir() -> Path:
    base = os.environ.get("HYCOMP_CACHE_DIR")
    if base:
        return Path(base) / "native"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "hycomp" / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


# tried in order, best first: -march=native (this CPU's vector width), 512-bit vectors where
# it has them (x86-64; faster than 256-bit), OpenMP (the blocks run on PyTorch's own
# OpenMP threads: see _run), glibc's vector exp for float64 (float32 has its own, exp_f32);
# the last set is plain C
_BASE = ["-O3", "-fno-math-errno", "-lm"]
_FLAG_SETS = (
    ["-march=native", "-mprefer-vector-width=512", "-fopenmp", "-DHYCOMP_LIBMVEC", "-lmvec"],
    ["-march=native", "-fopenmp", "-DHYCOMP_LIBMVEC", "-lmvec"],
    ["-march=native", "-fopenmp"],
    ["-march=native", "-fopenmp-simd"],
    [],
)


def _build() -> Path:
    """Path of the built library (building it if this source/compiler/CPU has none yet);
    raises RuntimeError with the compiler's words when no flag set builds."""
    cc = _compiler()
    if cc is None and os.environ.get("CC"):
        raise RuntimeError(f"CC={os.environ['CC']} is not an executable on PATH; point CC at a "
                           "C compiler (gcc, clang) or unset it")
    if cc is None:
        raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang); install gcc "
                           "(Debian/Ubuntu: apt install gcc) or set CC")
    src = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C compiler {cc} does not run: {e}") from None
    key = hashlib.sha256(b"\0".join([src, cc.encode(), version.encode(),
                                     _cpu_flags().encode(), platform.machine().encode()]))
    out_dir = cache_dir()
    out = out_dir / f"diag_scan-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise RuntimeError(f"cannot write the build cache {out_dir} ({e}); set "
                           "HYCOMP_CACHE_DIR to a writable folder") from None
    errors = []
    for flags in _FLAG_SETS:
        # built under a temporary name and renamed: processes building at once (torchrun's
        # ranks) never load a half-written file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [cc, "-shared", "-fPIC", str(SOURCE), "-o", tmp, *flags, *_BASE]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            r = None
            errors.append(f"{' '.join(cmd)}: {e}")
        if r is not None and r.returncode == 0:
            os.replace(tmp, out)
            return out
        if r is not None:
            errors.append(f"{' '.join(cmd)}:\n{r.stderr.strip()[-800:]}")
        Path(tmp).unlink(missing_ok=True)
    raise RuntimeError("the C compiler could not build blocks/ops/recurrence/diag_scan.c:\n"
                       + "\n".join(errors))


def _load() -> ctypes.CDLL | None:
    global _lib, _why, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("HYCOMP_NATIVE", "1") == "0":
            _why = "turned off by HYCOMP_NATIVE=0"
            return None
        try:
            path = _build()
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:            # a damaged file in the cache: built again, once
                path.unlink(missing_ok=True)
                lib = ctypes.CDLL(str(_build()))
        except (RuntimeError, OSError) as e:
            _why = str(e)
            return None
        i64, p = ctypes.c_int64, ctypes.c_void_p
        for suf in ("f32", "f64"):
            f = getattr(lib, f"scan_fwd_{suf}")
            f.argtypes = [p] * 9 + [i64] * 8
            f.restype = ctypes.c_int
            f = getattr(lib, f"scan_bwd_{suf}")
            f.argtypes = [p] * 14 + [i64] * 8
            f.restype = ctypes.c_int
        lib.scan_lanes.restype = ctypes.c_int
        lib.scan_openmp.restype = ctypes.c_int
        _lib = lib
        return lib


def unavailable() -> str | None:
    """None when the C scan is built and loaded here, else why not and how to get it."""
    return None if _load() is not None else _why


def _forget_pool() -> None:
    global _pool, _pool_size
    _pool, _pool_size = None, 0   # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _run(fn, args: list, blocks: int) -> None:
    """fn(*args, lo, hi, threads) over blocks [0, blocks) on torch.get_num_threads() threads:
    those of the OpenMP runtime PyTorch runs on where the library was built with OpenMP (one
    call), else a pool of Python threads, one call each (ctypes lets go of the GIL)."""
    global _pool, _pool_size
    n = max(1, min(torch.get_num_threads(), blocks))
    if n == 1 or _lib.scan_openmp():
        rcs = [fn(*args, 0, blocks, n)]
    else:
        cuts = [blocks * i // n for i in range(n + 1)]
        if _pool is None or _pool_size < n:
            _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="hycomp-native"), n
        rcs = list(_pool.map(lambda i: fn(*args, cuts[i], cuts[i + 1], 1), range(n)))
    if any(rcs):
        raise MemoryError("the native scan could not allocate its per-block buffers")


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _sizes(q, v):
    """(library, B, T, Hk, K, R, blocks per group) of a call: q (B, T, Hk, K), v (B, T, H)."""
    lib = _load()
    B, T, Hk, K = q.shape
    R = v.shape[2] // Hk
    return lib, B, T, Hk, K, R, -(-R // lib.scan_lanes())


class _NativeScan(torch.autograd.Function):
    """q, k (B, T, Hk, K); v, lg (B, T, H); At (K, H) or None (one gate per head); h0
    (B, H, K); all contiguous, float32 or float64. Returns y (B, T, H) and h_T (B, H, K)."""

    @staticmethod
    def forward(ctx, q, k, v, lg, At, h0):
        lib, B, T, Hk, K, R, P = _sizes(q, v)
        H = Hk * R
        y = torch.empty(B, T, H, dtype=q.dtype)
        hT = torch.empty(B, H, K, dtype=q.dtype)
        ck = torch.empty(B, -(-T // CHECKPOINT), H, K, dtype=q.dtype)
        fn = lib.scan_fwd_f64 if q.dtype == torch.float64 else lib.scan_fwd_f32
        _run(fn, [_ptr(q), _ptr(k), _ptr(v), _ptr(lg), _ptr(At), _ptr(h0), _ptr(y), _ptr(hT),
                  _ptr(ck), T, Hk, K, R, CHECKPOINT], B * Hk * P)
        ctx.save_for_backward(q, k, v, lg, At, ck)
        ctx.set_materialize_grads(False)   # an unused output's gradient comes as None
        return y, hT

    @staticmethod
    @once_differentiable
    @no_autocast
    def backward(ctx, dy, dhT):
        q, k, v, lg, At, ck = ctx.saved_tensors
        lib, B, T, Hk, K, R, P = _sizes(q, v)
        H = Hk * R
        dy = (torch.zeros_like(v) if dy is None else dy.to(q.dtype)).contiguous()
        dhT = None if dhT is None else dhT.to(q.dtype).contiguous()
        dq = torch.empty(B, T, Hk, P, K, dtype=q.dtype)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(v)
        dlg = torch.empty_like(v)
        dAt = torch.zeros(B, K, H, dtype=q.dtype)
        dh0 = torch.empty(B, H, K, dtype=q.dtype)
        fn = lib.scan_bwd_f64 if q.dtype == torch.float64 else lib.scan_bwd_f32
        _run(fn, [_ptr(q), _ptr(k), _ptr(v), _ptr(lg), _ptr(At), _ptr(ck), _ptr(dy),
                  _ptr(dhT), _ptr(dq), _ptr(dk), _ptr(dv), _ptr(dlg), _ptr(dAt), _ptr(dh0),
                  T, Hk, K, R, CHECKPOINT], B * Hk * P)
        dq = dq[..., 0, :] if P == 1 else dq.sum(-2)
        dk = dk[..., 0, :] if P == 1 else dk.sum(-2)
        dA = None if At is None else dAt.sum(0)
        return dq, dk, dv, dlg, dA, dh0


def _native_shapes(q, k, v, log_g=None, state=None, chunk_size: int = 64, A=None):
    """V = 1 with gates per head or dt * A (Mamba-1, RG-LRU), not per key dim"""
    if v.shape[-1] != 1:
        return (f"it runs one value column per head (V = 1, as Mamba-1 and RG-LRU); "
                f"this call has V = {v.shape[-1]}")
    if log_g is not None and log_g.dim() == 4 and log_g.shape[-1] != 1:
        return "it takes one log gate per head, or dt with A (Mamba-1); not one per key dim"
    if q.device.type != "cpu":
        return "it runs on the CPU"
    return None


@register_backend(OP, "native", priority=25, devices=("cpu",), available=unavailable,
                  accepts=_native_shapes, pure=False)
@no_autocast
def recurrence_native(q, k, v, log_g=None, state=None, chunk_size: int = 64, A=None):
    """Compiled C scan for V = 1 on the CPU (Mamba-1, RG-LRU); built on first use with a C
    compiler."""
    B, T, H, _ = v.shape
    Hk, K = q.shape[2:]
    acc = accum_dtype(q.dtype)
    h0 = (torch.zeros(B, H, K, dtype=acc) if state is None else state.squeeze(-1).to(acc))
    if T == 0:
        return v.new_zeros(B, 0, H, 1, dtype=q.dtype), h0[..., None].to(q.dtype)
    if log_g is None:
        lg = torch.zeros(B, T, H, dtype=acc)
    else:
        lg = log_g.squeeze(-1) if log_g.dim() == 4 else log_g
    At = None if A is None else A.to(acc).t().contiguous()
    args = [t.to(acc).contiguous() for t in (q, k, v.squeeze(-1), lg)]
    y, hT = _NativeScan.apply(*args, At, h0.contiguous())
    return y[..., None].to(q.dtype), hT[..., None].to(q.dtype)
