"""One decode step (T = 1) of the recurrence ops: the ``step`` backends against the others.

    python tools/bench_step_ops.py              # median of 200 calls per backend, in µs
    python tools/bench_step_ops.py --calls 1000 --threads 1

Each backend is called directly (no registry look-up) under ``torch.no_grad``, float32, on the
CPU, with the inputs of one decode step: Mamba-2-like (B=1, H=8, K=64, V=64, one gate per head;
q and k per head, and shared by all heads as Mamba-2's single group), Gated-DeltaNet-like
(B=1, H=4, K=64, V=64, one decay per head) and Mamba-1-like (H = d_inner = 512 channel-heads,
K = d_state = 16, V = 1, dt * A) where ``native`` and ``scan`` are the other candidates.
Each backend runs ``--calls`` calls in a row (its own tensors warm in cache, as in a decode
loop) once per round, the backends taking turns; the best round's median is reported, which
leaves out most of a shared machine's noise. Not imported by the package.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from composer.core.registry import ops  # noqa: E402


def glr(B=1, H=8, Hk=8, K=64, V=64, A=False):
    q, k = torch.randn(B, 1, Hk, K), torch.randn(B, 1, Hk, K) / K ** 0.5
    v = torch.randn(B, 1, H, V)
    state = torch.randn(B, H, K, V)
    if A:
        return (q, k, v, F.softplus(torch.randn(B, 1, H)), state), {"A": -torch.rand(H, K) - 0.5}
    return (q, k, v, -F.softplus(torch.randn(B, 1, H)), state), {}


def gated_delta(B=1, H=4, K=64, V=64):
    q, v = torch.randn(B, 1, H, K) / K ** 0.5, torch.randn(B, 1, H, V)
    k = F.normalize(torch.randn(B, 1, H, K), dim=-1)
    log_w, beta = -F.softplus(torch.randn(B, 1, H)), torch.rand(B, 1, H)
    return (q, k, v * beta[..., None], -beta * log_w.exp(), log_w, torch.randn(B, H, K, V)), {}


CASES = [
    ("Mamba-2-like, Hk = H = 8", "gated_linear_recurrence", glr(),
     ["step", "chunked", "reference"]),
    ("Mamba-2-like, Hk = 1, H = 8", "gated_linear_recurrence", glr(Hk=1),
     ["step", "chunked", "reference"]),
    ("Gated-DeltaNet-like, H = 4", "delta_rule", gated_delta(), ["step", "chunked", "reference"]),
    ("Mamba-1-like, H = 512, K = 16, V = 1", "gated_linear_recurrence",
     glr(H=512, Hk=1, K=16, V=1, A=True), ["step", "native", "scan", "chunked"]),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; µs per call: median "
          f"of {a.calls} calls in a row, best of {a.rounds} rounds")
    for title, op_name, (args, kwargs), names in CASES:
        table = ops()[op_name]
        fns = {n: table[n].fn for n in names if n in table
               and table[n].available() is None and table[n].refuses(args, kwargs) is None}
        best = {}
        with torch.no_grad():
            for fn in fns.values():                      # warm-up (and native's build)
                for _ in range(20):
                    fn(*args, **kwargs)
            for _ in range(a.rounds):
                for n, fn in fns.items():
                    times = []
                    for _ in range(a.calls):
                        t0 = time.perf_counter()
                        fn(*args, **kwargs)
                        times.append(time.perf_counter() - t0)
                    best[n] = min(best.get(n, float("inf")), statistics.median(times))
        row = "  ".join(f"{n} {t * 1e6:7.1f}" for n, t in best.items())
        print(f"{op_name:24s} {title:38s} {row}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
