"""Memory against time for the V = 1 scan backends, on the benchmark's Mamba-1 model.

    python tools/scan_memory.py                 # writes docs/memory.md
    python tools/scan_memory.py --lengths 2048 --out -

Each (backend, T) runs in a fresh process (so that its peak resident memory is its own): the
model of ``tools/bench.py``'s ``mamba`` case (d_model 256, 4 Mamba-1 layers, d_inner 512,
d_state 16, batch 1, fp32), one warm-up training step and then the median of three. ``native``
(compiled C) keeps one state per 64 steps and remakes the rest in its backward; ``scan`` (pure
PyTorch) keeps each layer's states for the backward; ``scan_recompute`` makes them again
there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["native", "scan", "scan_recompute"]


def measure(backend: str, T: int) -> dict:
    """One (backend, T) in this process: median step seconds and peak resident MiB."""
    import torch
    sys.path.insert(0, str(ROOT / "tools"))
    import bench
    from composer.run.runtime import tune_cpu_allocator
    torch.set_num_threads(2)
    tune_cpu_allocator()
    model, _ = bench.hycomp_model(bench.CASES["mamba"][0],
                                  {"gated_linear_recurrence": backend})
    step = bench._stepper(model, T)
    step()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"backend": backend, "T": T, "step_s": statistics.median(times), "peak_mib": peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", nargs="*", type=int, default=[2048, 16384])
    ap.add_argument("--out", default=str(ROOT / "docs" / "memory.md"),
                    help="markdown file to write, or - for stdout only")
    ap.add_argument("--one", nargs=2, metavar=("BACKEND", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:                                     # the child process
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return 0
    rows = []
    for T in args.lengths:
        for b in BACKENDS:
            p = subprocess.run([sys.executable, __file__, "--one", b, str(T)],
                               capture_output=True, text=True, cwd=ROOT)
            if p.returncode:
                print(p.stderr, file=sys.stderr)
                return p.returncode
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{b:15s} T={T:6d}  {r['step_s']:.3f} s/step  peak {r['peak_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
    from bench import _cpu_name  # noqa: E402  (tools/ is on the path when run as a script)
    lines = ["# Memory: the Mamba-1 scan backends", "",
             f"Machine: {_cpu_name()}, 2 threads; measured {datetime.date.today().isoformat()}. "
             "Made by `python tools/scan_memory.py`: the `mamba` model of `tools/bench.py` "
             "(d_model 256, 4 Mamba-1 layers, d_inner 512, d_state 16; batch 1, fp32), one "
             "training step, each row in a fresh process (peak resident memory of the whole "
             "process, Python and torch included).", "",
             "| backend | T | s / step | tokens/s | peak resident MiB |", "|---|---|---|---|---|"]
    lines += [f"| `{r['backend']}` | {r['T']} | {r['step_s']:.3f} | {r['T'] / r['step_s']:,.0f} "
              f"| {r['peak_mib']:,.0f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tools"))
    sys.exit(main())
