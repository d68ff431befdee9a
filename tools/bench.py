"""Training-step throughput of hycomp models against Hugging Face equivalents, on this machine.

    python tools/bench.py                       # everything, writes docs/benchmarks.md
    python tools/bench.py --cases llama mamba2 --lengths 512 2048 --out -

One step = forward + backward of the mean next-token cross-entropy, batch 1, fp32, the sizes
below (d_model 256, 4 layers, vocab 256); tokens/s = T / median step time over repeats after one
warm-up step. Both sides of a case are built with matching widths and timed interleaved, step
for step, in the same process, so they see the same machine state. Also measured: each op's
``chunked`` backend (and ``auto``'s pick) against its ``reference`` at T=2048 (forward +
backward), with the seconds of auto's matrix products, achieved GFLOP/s (3 x the
layer graph's forward FLOPs per token x T / step time) and this machine's fp32 matmul
throughput. Not imported by the package; needs transformers (the test extra).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.modules.setdefault("fla", None)  # keep transformers' Qwen3-Next on its torch path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import composer  # noqa: E402
from composer.build.costs import totals  # noqa: E402
from composer.core.registry import block_types  # noqa: E402

D, L, V, FF = 256, 4, 256, 704


# --------------------------------------------------------------------------------------------
# hycomp recipes and their HF counterparts
# --------------------------------------------------------------------------------------------
def hycomp_model(model: dict, kernels: dict | None = None):
    d = composer.compose_dict("config")
    d["model"] = {"vocab_size": V, "d_model": D, "n_layers": L, "max_seq_len": 32768,
                  "tie_embeddings": True, **model}
    d["kernels"] = kernels or {}
    recipe = composer.validate_recipe(d)
    return composer.build_model(recipe), composer.layer_graph(recipe)


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L,
                                        num_attention_heads=4, num_key_value_heads=4,
                                        intermediate_size=FF, max_position_embeddings=32768,
                                        tie_word_embeddings=True))


def hf_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=4, head_dim=64, intermediate_size=FF, sliding_window=512,
        layer_types=["sliding_attention"] * L, max_position_embeddings=32768,
        query_pre_attn_scalar=64))


def hf_mamba2():
    from transformers import Mamba2Config, Mamba2ForCausalLM
    return Mamba2ForCausalLM(Mamba2Config(vocab_size=V, hidden_size=D, num_hidden_layers=L,
                                          num_heads=8, head_dim=64, state_size=64, n_groups=1,
                                          expand=2, chunk_size=64, tie_word_embeddings=True))


def hf_gdn():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
    return Qwen3NextForCausalLM(Qwen3NextConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=4, head_dim=64, intermediate_size=FF, num_experts=0,
        layer_types=["linear_attention"] * L, linear_num_key_heads=4, linear_num_value_heads=4,
        linear_key_head_dim=64, linear_value_head_dim=64, max_position_embeddings=32768,
        tie_word_embeddings=True, use_cache=False))


MLP = {"mlp": {"activation": "swiglu", "d_ff": FF}}
CASES = {
    # name: (hycomp model section, HF builder or None, block types it needs)
    "llama": ({"ffn": "mlp", "blocks": {"attention": {"n_heads": 4}, **MLP},
               "schedule": {"pattern": "*"}}, hf_llama, ["attention"]),
    "gemma3_w512": ({"ffn": "mlp", "blocks": {"attention": {"n_heads": 4, "window": 512},
                                              "mlp": {"activation": "geglu", "d_ff": FF}},
                     "schedule": {"pattern": "*"}}, hf_gemma3, ["attention"]),
    "mamba2": ({"ffn": None, "blocks": {"mamba2": {"d_state": 64, "head_dim": 64,
                                                   "chunk_size": 64}},
                "schedule": {"pattern": "M"}}, hf_mamba2, ["mamba2"]),
    "gated_deltanet": ({"ffn": "mlp", "blocks": {"gated_deltanet": {"n_k_heads": 4,
                                                                       "n_v_heads": 4}, **MLP},
                        "schedule": {"pattern": "G"}}, hf_gdn, ["gated_deltanet"]),
    "mamba": ({"ffn": None, "blocks": {"mamba": {}}, "schedule": {"pattern": "m"}},
              None, ["mamba"]),
    "gla": ({"ffn": "mlp", "blocks": {"gla": {}, **MLP}, "schedule": {"pattern": "g"}},
            None, ["gla"]),
    "retnet": ({"ffn": "mlp", "blocks": {"retnet": {}, **MLP},
                "schedule": {"pattern": "R"}}, None, ["retnet"]),
    "linear_attention": ({"ffn": "mlp", "blocks": {"linear_attention": {}, **MLP},
                          "schedule": {"pattern": "L"}}, None,
                         ["linear_attention"]),
    "deltanet": ({"ffn": "mlp", "blocks": {"deltanet": {}, **MLP},
                  "schedule": {"pattern": "D"}}, None, ["deltanet"]),
    "rwkv7": ({"ffn": "mlp", "blocks": {"rwkv7": {}, **MLP}, "schedule": {"pattern": "W"}},
              None, ["rwkv7"]),
}


# --------------------------------------------------------------------------------------------
def _stepper(model, T: int):
    """A function running one forward + backward step of ``model`` at length T."""
    ids = torch.randint(0, V, (1, T + 1))

    def one():
        model.zero_grad(set_to_none=True)
        out = model(ids[:, :-1])
        logits = out.logits if hasattr(out, "logits") else out
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()

    return one


def step_times(models: list, T: int, min_reps: int = 3, budget_s: float = 6.0) -> list[float]:
    """Median seconds of one step for each model, measured interleaved (A, B, A, B, ...) after
    one warm-up step each, so slow drifts of a shared machine hit every model alike."""
    steps = [_stepper(m, T) for m in models]
    for one in steps:
        one()
    times: list[list[float]] = [[] for _ in models]
    start = time.perf_counter()
    while len(times[0]) < min_reps or (time.perf_counter() - start < budget_s
                                       and len(times[0]) < 10):
        for one, ts in zip(steps, times):
            t = time.perf_counter()
            one()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def op_speedups(T: int = 2048) -> list[list]:
    """[op, shape, reference s, chunked s, auto's backend, auto s, auto's matmul s, aten calls,
    best pure-PyTorch backend, its s]: median of 5 forward + backward runs (the backends
    interleaved) after two warm-ups, per op and representative per-layer shape at d_model 256,
    with each block's default chunk length. ``auto`` is what a model gets: the registry's pick
    for that call (for V = 1 shapes on the CPU the compiled ``native`` backend where a C
    compiler is present); the best pure-PyTorch backend is the pick among backends written in
    PyTorch alone (``scan`` for those shapes). Attention's reference is a dense masked softmax,
    not a loop: its rows show what the banded form saves, not a recurrence's loop overhead."""
    from composer.core.kernels import op, use_kernels
    from composer.core.registry import candidates, pick, resolve_backend
    out = []
    for name, label, (args, kw) in _op_shapes(T):
        def run(b):
            leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
            with use_kernels({name: b}):
                t = time.perf_counter()
                o = op(name)(*leaves, **kw)
                o = o[0] if isinstance(o, tuple) else o
                o.float().square().mean().backward()
                return time.perf_counter() - t
        where = (args[0].device, args[0].dtype)
        auto = resolve_backend(name, "auto", *where, (args, kw)).name
        pure = pick([b for b in candidates(name, "auto", *where) if b.pure], "auto",
                    (args, kw)).name
        backends = list(dict.fromkeys(("reference", "chunked", pure, auto)))
        for b in backends:
            run(b), run(b)  # warm-up
        runs = {b: [] for b in backends}
        for _ in range(5):          # interleaved, so that drifts of the machine hit all alike
            for b in backends:
                runs[b].append(run(b))
        times = {b: statistics.median(ts) for b, ts in runs.items()}
        mm_s, calls = _matmul_share(lambda: run(auto))
        out.append([name, label, times["reference"], times["chunked"], auto, times[auto],
                    mm_s, calls, pure, times[pure]])
        print(f"op {name:24s} {label:40s} ref {times['reference']:.3f}s  "
              f"chunked {times['chunked']:.4f}s  {pure} {times[pure]:.4f}s "
              f"{times['reference'] / times[pure]:.0f}x  {auto} {times[auto]:.4f}s  "
              f"{times['reference'] / times[auto]:.0f}x  matmuls {mm_s:.4f}s  {calls} calls",
              file=sys.stderr, flush=True)
    return out


MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm"}


def _matmul_share(fn) -> tuple[float, int]:
    """(seconds in matrix products, aten calls) of one profiled run of fn: the products' self
    time is the part no elementwise rewrite can remove, so reference / that time bounds the
    speed-up any implementation spending the same products could reach."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6
    return mm, sum(e.count for e in events if e.key.startswith("aten::"))


def _op_shapes(T):
    """(op, shape label, (args, kwargs)): one training-sized layer of each family."""
    H, K, Vd = 8, 64, 64
    glr = [torch.randn(1, T, H, K), torch.randn(1, T, H, K) / 8, torch.randn(1, T, H, Vd)]
    D_inner, N = 512, 16  # Mamba-1 at d_model 256: C, B, dt * x, dt; A
    mamba = [torch.randn(1, T, 1, N), torch.randn(1, T, 1, N), torch.randn(1, T, D_inner, 1),
             torch.rand(1, T, D_inner) * 0.1]
    W = 256  # RG-LRU width at d_model 256: q = k = 1, K = V = 1
    ones = torch.ones(1, T, 1, 1)
    Hd, Kd = 4, 64  # delta rule: q, k, v, b (scalar: b * k_t, the plain delta rule), log_w
    att = [torch.randn(1, 4, T, 64) for _ in range(3)]
    return [
        ("gated_linear_recurrence", "8 heads, K = V = 64, gate per head",
         (glr + [-torch.rand(1, T, H)], {})),
        ("gated_linear_recurrence", "8 heads, K = V = 64, gate per key dim",
         (glr + [-torch.rand(1, T, H, K) / 8], {})),
        ("gated_linear_recurrence", "Mamba-1: 512 heads, K = 16, V = 1",
         (mamba, {"A": -torch.rand(D_inner, N) * 8})),
        ("gated_linear_recurrence", "RG-LRU: 256 heads, K = V = 1",
         ([ones, ones, torch.randn(1, T, W, 1), -torch.rand(1, T, W)], {"chunk_size": 32})),
        ("delta_rule", "4 heads, K = V = 64",
         ([torch.randn(1, T, Hd, Kd), F.normalize(torch.randn(1, T, Hd, Kd), dim=-1),
           torch.randn(1, T, Hd, Kd), -torch.rand(1, T, Hd), -torch.rand(1, T, Hd)], {})),
        ("attention", "4 heads, head_dim 64, global", (att, {})),
        ("attention", "4 heads, head_dim 64, window 512", (att, {"window": 512})),
    ]


def fmt_rate(tps: float | None) -> str:
    return "—" if tps is None else f"{tps / 1000:.1f}k"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES),
                    help="model cases to time (none: only the op table)")
    ap.add_argument("--lengths", nargs="*", type=int, default=[512, 2048, 8192, 16384])
    ap.add_argument("--hf-max-len", type=int, default=8192,
                    help="skip HF models above this length (their numbers are for comparison)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-ops", dest="ops", action="store_false",
                    help="skip the table of ops (reference / chunked / auto)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"),
                    help="markdown file to write, or - for stdout only")
    ap.add_argument("--results", default=str(ROOT / "docs" / "benchmarks.json"),
                    help="measurements kept between runs: a run replaces the rows of the cases "
                         "it measures and the table shows them all")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from composer.run.runtime import tune_cpu_allocator
    tuned = tune_cpu_allocator()  # for both sides alike (see composer/run/runtime.py)
    have = block_types()
    rows, scaling, gflops = [], [], []
    peak = matmul_gflops()
    # ops first, in a fresh process heap: after the long-sequence models the heap is large and
    # fragmented, and every fresh buffer is page-faulted again (measured: the Mamba-1 scan took
    # 0.061 s there against 0.050 s here)
    speed = op_speedups() if args.ops else []
    for name in args.cases:
        model_cfg, hf_build, needs = CASES[name]
        if not all(n in have for n in needs):
            print(f"skip {name}: block types {needs} not all registered", file=sys.stderr)
            continue
        ours, graph = hycomp_model(model_cfg)
        hf = hf_build() if hf_build else None
        per_t = {}
        for T in args.lengths:
            pair = [ours] + ([hf] if hf is not None and T <= args.hf_max_len else [])
            t_ours, t_hf = (step_times(pair, T) + [None])[:2]
            per_t[T] = t_ours
            fl = 3 * totals(graph, T)["flops_per_token"] * T / t_ours / 1e9
            gflops.append((name, T, fl))
            rows.append((name, T, T / t_ours, None if t_hf is None else T / t_hf))
            print(f"{name:18s} T={T:6d}  hycomp {T / t_ours:8.0f} tok/s"
                  + (f"  HF {T / t_hf:8.0f} tok/s  ratio {t_hf / t_ours:5.2f}x" if t_hf else "")
                  + f"  {fl:6.1f} GFLOP/s", file=sys.stderr, flush=True)
        if 2048 in per_t and 16384 in per_t:
            scaling.append((name, per_t[16384] / per_t[2048]))
    store = _merge(Path(args.results), {"machine": _cpu_name(), "threads": args.threads,
                                        "torch": torch.__version__, "tuned": tuned,
                                        "date": datetime.date.today().isoformat(),
                                        "matmul_gflops": peak, "rows": rows, "speed": speed,
                                        "scaling": scaling, "gflops": gflops})
    text = render(store)
    if args.out == "-":
        print(text)
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        # keep the sections other tools write (tools/bench_generate.py's, between markers)
        old = out.read_text() if out.exists() else ""
        keep = old.find("<!-- generate_bench: begin")
        out.write_text(text.rstrip("\n") + "\n\n" + old[keep:] if keep >= 0 else text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _merge(path: Path, new: dict) -> dict:
    """Keep earlier rows of cases this run did not measure (same machine, threads and torch)."""
    old = json.loads(path.read_text()) if path.exists() else None
    if old and all(old.get(k) == new[k] for k in ("machine", "threads", "torch", "tuned")):
        ran = {r[0] for r in new["rows"]}
        for key in ("rows", "scaling", "gflops"):
            new[key] = [r for r in old[key] if r[0] not in ran] + new[key]
        done = {tuple(r[:2]) for r in new["speed"]}
        new["speed"] = [r for r in old["speed"]
                        if len(r) == 10 and tuple(r[:2]) not in done] + new["speed"]
        new["date"] = min(old["date"], new["date"]) + (
            "" if old["date"] == new["date"] else f" to {new['date']}")
        new["matmul_runs"] = old.get("matmul_runs", [old["matmul_gflops"]]) + [
            new["matmul_gflops"]]
    new.setdefault("matmul_runs", [new["matmul_gflops"]])
    new["matmul_gflops"] = max(new["matmul_runs"])  # shares below are against the best run
    order = {n: i for i, n in enumerate(CASES)}
    for key in ("rows", "scaling", "gflops"):
        new[key].sort(key=lambda r: (order.get(r[0], 99), r[1] if len(r) > 2 else 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(new, indent=1) + "\n")
    return new


def render(st: dict) -> str:
    lines = ["# Benchmarks", "",
             f"Machine: {st['machine']}, {st['threads']} threads; torch {st['torch']}; "
             f"Python {platform.python_version()}; measured {st['date']}.",
             f"Made by `python tools/bench.py` (one training step, forward + backward, "
             f"batch 1, fp32, d_model {D}, {L} layers, vocab {V}; hycomp and HF timed "
             f"interleaved in one process; glibc allocator tuning "
             f"{'on' if st['tuned'] else 'off'} for the whole process, so for both sides: "
             "`composer/run/runtime.py`). Raw numbers: `docs/benchmarks.json`.", ""]
    lines += targets(st)
    lines += ["## Tokens per second, hycomp vs Hugging Face", "",
             "| model | T | hycomp tok/s | HF tok/s | hycomp / HF |", "|---|---|---|---|---|"]
    for name, T, ours, hf in st["rows"]:
        ratio = f"{ours / hf:.2f}x" if hf else "—"
        lines.append(f"| {name} | {T} | {fmt_rate(ours)} | {fmt_rate(hf)} | {ratio} |")
    lines += ["", "## Scaling: step time at T=16384 over T=2048 (ideal 8x)", "",
              "| model | ratio |", "|---|---|"]
    lines += [f"| {n} | {r:.1f}x |" for n, r in st["scaling"]]
    lines += ["", "## Ops at T=2048: `reference`, `chunked`, the best pure-PyTorch backend and "
              "what `auto` runs (forward + backward of one layer's op)", "",
              "Pure PyTorch: the backend `auto` picks among those written in PyTorch alone; "
              "`auto` may instead pick compiled code (`native`: C built on first use, "
              "`blocks/ops/recurrence/native.py`). `auto`'s matmuls: the self time of its matrix "
              "products in one profiled run (profiling slows the rest, not these); reference "
              "/ that time is the most any implementation doing the same products could "
              "reach. Calls: aten ops per forward + backward.", "",
              "| op | shape | reference s | chunked s | pure PyTorch | its s | reference / it "
              "| auto | auto s | reference / auto | auto's matmuls s | reference / matmuls "
              "| calls |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {shape} | {a:.3f} | {b:.4f} | {pure} | {p:.4f} | {a / p:.0f}x "
              f"| {auto if auto != pure else 'same'} | {c:.4f} | {a / c:.0f}x "
              f"| {mm:.4f} | {f'{a / mm:.0f}x' if mm else '—'} | {calls} |"
              for n, shape, a, b, auto, c, mm, calls, pure, p in st["speed"]]
    runs = st.get("matmul_runs", [st["matmul_gflops"]])
    lines += ["", f"## Achieved GFLOP/s (this machine's fp32 2048² matmul: "
              f"{min(runs):.0f}–{max(runs):.0f} GFLOP/s over {len(runs)} runs; shares "
              f"against the best)", "",
              "| model | T | GFLOP/s | share of matmul peak |", "|---|---|---|---|"]
    lines += [f"| {n} | {T} | {g:.1f} | {100 * g / st['matmul_gflops']:.0f}% |"
              for n, T, g in st["gflops"]]
    return "\n".join(lines) + "\n"


def targets(st: dict) -> list[str]:
    """The issue's performance targets, each checked against the numbers below (computed here
    from the stored measurements, so the table cannot disagree with them)."""
    rows = []
    for name, T, ours, hf in st["rows"]:
        if hf:
            need = 2.0 if name.startswith("gemma3") and T == 8192 else 1.0
            rows.append((f"{name} at T={T}: hycomp / HF >= {need:g}", f"{ours / hf:.2f}x",
                         ours / hf >= need))
    for name, r in st["scaling"]:
        if name != "llama":                 # global attention is quadratic by design
            rows.append((f"{name}: step(16384) / step(2048) <= 10", f"{r:.1f}x", r <= 10))
    compiled = []
    for n, shape, a, b, auto, c, mm, calls, pure, p in st["speed"]:
        if n != "attention":                # its reference is not a loop; see the op table
            rows.append((f"{n} ({shape}): reference / {pure} >= 20", f"{a / p:.0f}x",
                         a / p >= 20))
            if auto != pure:
                compiled.append(f"{shape} {a / c:.0f}x")
    if not rows:
        return []
    met = sum(ok for *_, ok in rows)
    out = [f"## Targets ({met} of {len(rows)} met in these measurements)", "",
           "On this shared 2-core machine, model steps vary by about 5% between runs and the "
           "Python-bound sequential references by more, so a target near its threshold can "
           "flip between runs. The references loop over tokens with `unbind` (linear time); "
           "an `x[:, t]` loop has a quadratic backward and would inflate the op ratios.", "",
           "| target | measured | met |", "|---|---|---|"]
    out += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in rows]
    if compiled:
        out += ["", "The op targets are for pure PyTorch. Where `auto` runs compiled code "
                "instead (`native`), reference / auto: " + "; ".join(compiled) + "."]
    return out + [""]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
