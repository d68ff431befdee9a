"""Generation speed and cache memory of hycomp models against Hugging Face's ``generate``.

    python tools/bench_generate.py                  # everything (~6 min on 2 cores): writes
                                                    # docs/benchmarks.md (section "Generation"),
                                                    # docs/generate_bench.json and .png
    python tools/bench_generate.py --quick          # tiny sizes, < 1 min, prints to stdout only
    python tools/bench_generate.py --cases llama mamba2 --contexts 512 4096 --batches 1 --out -

Per case (the sizes of ``tools/bench.py``: d_model 256, 4 layers, vocab 256; its builders are
reused), context and batch size, both sides in one process, fp32, ``torch.no_grad``, the default
torch thread count:

* **ms per new token**: the median gap between consecutive new tokens. hycomp: a loop of
  ``model.decode_step`` and a greedy argmax on a cache built by ``model.prefill``. Hugging Face:
  its own ``model.generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)`` continuing
  from a ``DynamicCache`` that holds the context, each new token time-stamped by a
  ``LogitsProcessor`` (called once per step, right after the forward). Each side builds its
  context once, then the two alternate rounds (hycomp, HF, hycomp, HF, ...), each round
  ``--warmup`` + ``--steps`` gaps of which the first ``--warmup`` are dropped: ``--rounds`` at
  least, more (up to ``--max-rounds``) until a side's rounds add up to ``--min-time`` seconds;
  the median is over the kept gaps of all rounds.
* **cache bytes**: hycomp ``cache.nbytes``; HF the bytes of the tensors in its cache object
  (attention keys/values, sliding-window keys/values, Mamba / linear-attention conv and
  recurrent states), both taken after the last round, when they hold the context plus the new
  tokens (hycomp's global KV buffers are preallocated for exactly that).
* **prefill throughput**: hycomp ``model.prefill`` (one chunk, and chunks of 2048 as
  ``generate`` does) against a training forward ``model(input_ids)`` (autograd on, all logits)
  at ``--prefill-length`` tokens, batch 1, interleaved, median of ``--prefill-reps``.

How the context is built. Real tokens are prefilled (hycomp ``model.prefill`` in chunks of 2048;
HF its forward with the cache in chunks of 2048, both under no_grad) for the first
R = min(context, max(``--real-tokens`` // batch, 512)) positions (by default all of them at
batch 1, 4096 at batch 8). Prefilling real tokens to 32k at batch 8 for global attention is
quadratic (minutes, for HF more), and a decode step's cost
depends only on what the cache holds, so the remaining context - R positions are synthetic: every
global-attention KV cache is extended to the full context with copies of the real keys and values
(position p holds those of position p mod R) and the position counters advanced; a
sliding-window cache is full after R >= window real tokens, so only its position counter moves;
fixed-size states (Mamba-2, Gated DeltaNet) stay as the real prefix left them. For HF the
prompt handed to ``generate`` is the context plus one token, of which its own prefill runs only
the last (the cache already holds the rest); for a cache with no attention layer (Mamba-2,
Gated DeltaNet), where ``generate`` cannot tell how much the cache holds, only that one token:
its per-step bookkeeping then grows with the new tokens, not the context (in HF's favour).

Shared machine: one run at a time (a lock file; a second run waits), and a row during which other
processes used more than a quarter of a core (``/proc/stat``) is measured again (``--retries``)
and otherwise marked in the table. ``--merge`` re-measures some rows into the stored results,
``--render`` rewrites the section and plot from them.

Not imported by the package; needs transformers (the test extra) and matplotlib for the plot.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (puts the repo root on sys.path and blocks ``fla``)
from bench import CASES, D, FF, L, MLP, V, hycomp_model  # noqa: E402

import torch  # noqa: E402

ROOT = bench.ROOT
PREFILL_CHUNK = 2048
MARK_BEGIN = "<!-- generate_bench: begin (written by tools/bench_generate.py) -->"
MARK_END = "<!-- generate_bench: end -->"


# --------------------------------------------------------------------------------------------
# cases: four of tools/bench.py, and a 3:1 Mamba-2 : attention hybrid against Bamba
# --------------------------------------------------------------------------------------------
def hf_bamba():
    """IBM's Bamba: Mamba-2 mixers with global attention at the listed layers, and a SwiGLU MLP
    after every mixer; its attention rotates half of each head's dims (hard-coded
    partial_rotary_factor 0.5), so the hycomp side uses rope_fraction 0.5."""
    from transformers import BambaConfig, BambaForCausalLM
    return BambaForCausalLM(BambaConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=FF, attn_layer_indices=[3], mamba_n_heads=8,
        mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1, mamba_expand=2,
        mamba_chunk_size=64, tie_word_embeddings=True, max_position_embeddings=32768))


HYBRID = {"ffn": "mlp",
          "blocks": {"mamba2": {"d_state": 64, "head_dim": 64, "chunk_size": 64},
                     "attention": {"n_heads": 4, "rope_fraction": 0.5}, **MLP},
          "schedule": {"pattern": "MMM*"}}

GEN_CASES = {
    # name: (hycomp model section, HF builder, kind: "global" (a cache that grows) or "flat")
    "llama": (CASES["llama"][0], CASES["llama"][1], "global"),
    "gemma3_w512": (CASES["gemma3_w512"][0], CASES["gemma3_w512"][1], "flat"),
    "mamba2": (CASES["mamba2"][0], CASES["mamba2"][1], "flat"),
    "gated_deltanet": (CASES["gated_deltanet"][0], CASES["gated_deltanet"][1], "flat"),
    "hybrid_3to1": (HYBRID, hf_bamba, "global"),
}
LABELS = {"llama": "attention (Llama)", "gemma3_w512": "sliding window 512 (Gemma 3)",
          "mamba2": "Mamba-2", "gated_deltanet": "Gated DeltaNet (Qwen3-Next)",
          "hybrid_3to1": "3:1 Mamba-2 : attention (Bamba)"}


def hf_build_model(build):
    """An HF model in eval mode with its cache on (tools/bench.py turns Qwen3-Next's off for
    training)."""
    model = build().eval()
    model.config.use_cache = True
    model.generation_config.use_cache = True
    return model


# --------------------------------------------------------------------------------------------
# building a context
# --------------------------------------------------------------------------------------------
def real_length(ctx: int, batch: int, real_tokens: int) -> int:
    return min(ctx, max(real_tokens // batch, 512))


def _tile(x: torch.Tensor, n: int) -> torch.Tensor:
    """x (..., R, d) along dim -2 repeated to n positions (position p holds x's p mod R)."""
    R = x.shape[-2]
    reps = -(-n // R)
    return x.repeat(*([1] * (x.dim() - 2)), reps, 1)[..., :n, :]


def _advance_hycomp(state, ctx: int, capacity: int):
    """``state`` (nested) with every KV cache moved to position ctx: a global one reserved for
    ``capacity`` tokens and filled with copies of its real positions, a ring only renumbered."""
    from blocks.common import KVCache
    if isinstance(state, dict):
        return {k: _advance_hycomp(v, ctx, capacity) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_advance_hycomp(v, ctx, capacity) for v in state)
    if not isinstance(state, KVCache) or state.pos >= ctx:
        return state
    if state.kind == "global" and state.limit is None:
        R = state.pos
        state.reserve(capacity)
        st = state.store
        st.k[:, :, R:ctx] = _tile(st.k[:, :, :R], ctx - R)
        st.v[:, :, R:ctx] = _tile(st.v[:, :, :R], ctx - R)
    elif state.ring is None or state.held() < state.ring:
        raise RuntimeError(f"cannot advance a {state.kind} KV cache holding {state.held()} "
                           "positions synthetically; prefill more real tokens")
    state.store.frontier = ctx
    return KVCache(state.store, ctx, state.kind, state.ring, state.limit, state.shift)


def hycomp_context(model, ids: torch.Tensor, ctx: int, capacity: int):
    """A cache holding ``ctx`` positions: ``ids`` (B, R) prefilled, the rest synthetic.
    Returns (cache, logits of the last real position)."""
    cache = model.init_cache(ids.shape[0], capacity)
    logits = model.prefill(ids, cache, chunk_size=PREFILL_CHUNK)
    if ctx > ids.shape[1]:
        cache.states = _advance_hycomp(cache.states, ctx, capacity)
        cache.pos = ctx
    return cache, logits


def _counting_cache_class():
    from transformers import DynamicCache

    class CountingCache(DynamicCache):
        """A DynamicCache that reports the tokens it has seen. Hugging Face's Qwen3-Next asks
        its cache for ``get_seq_length()`` (position ids) and ``get_mask_sizes()`` (the
        full-attention mask) on every forward, and a
        DynamicCache whose layers are all linear-attention raises there, so an all-Gated
        DeltaNet Qwen3-Next cannot decode with a cache at all (``use_cache=False`` would
        recompute the whole sequence per token). This reports what an attention layer would."""

        seen = 0

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.seen

        def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
            return self.seen + query_length, 0

    return CountingCache


def _count_tokens(module, args, kwargs, output):
    cache = kwargs.get("cache")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if cache is not None and hasattr(cache, "seen") and ids is not None:
        cache.seen += ids.shape[1]


def hf_new_cache(model):
    """The cache ``generate`` would make for ``model`` (a counting one where all layers are
    linear, see :func:`_counting_cache_class`)."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    if all(getattr(cache, "is_linear", [False])):
        cache = _counting_cache_class()(config=model.config)
        if not getattr(model, "_bench_counting", False):
            model.register_forward_hook(_count_tokens, with_kwargs=True)
            model._bench_counting = True
    return cache


def hf_context(model, ids: torch.Tensor, ctx: int):
    """A DynamicCache holding ``ctx`` positions, built like :func:`hycomp_context`."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    cache = hf_new_cache(model)
    for a in range(0, ids.shape[1], PREFILL_CHUNK):
        model(input_ids=ids[:, a:a + PREFILL_CHUNK], cache=cache, use_cache=True,
              logits_to_keep=1)
    R = ids.shape[1]
    if ctx > R:
        if hasattr(cache, "seen"):
            cache.seen = ctx
        for layer in cache.layers:
            if isinstance(layer, DynamicSlidingWindowLayer):
                if layer.keys.shape[-2] < layer.sliding_window - 1:
                    raise RuntimeError("sliding window not full; prefill more real tokens")
                layer.cumulative_length = ctx
            elif isinstance(layer, DynamicLayer) and getattr(layer, "keys", None) is not None \
                    and layer.keys.numel():
                layer.keys = _tile(layer.keys, ctx)
                layer.values = _tile(layer.values, ctx)
    return cache


def hf_cache_bytes(cache) -> int:
    """Bytes of every tensor the cache object holds (each storage once)."""
    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    for layer in cache.layers:
        walk(vars(layer))
    return total


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _gaps(stamps: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]


class HycompSide:
    """hycomp at one (context, batch): the cache, then rounds of greedy decode steps."""

    def __init__(self, model, ids, ctx, capacity):
        self.model = model
        t0 = time.perf_counter()
        with torch.no_grad():
            self.cache, logits = hycomp_context(model, ids, ctx, capacity)
        self.build_s = time.perf_counter() - t0
        self.tok = logits.argmax(-1)

    @torch.no_grad()
    def round(self, n: int) -> list[float]:
        """Time stamps of n new tokens (the first is the one chosen before this round)."""
        stamps = [time.perf_counter()]
        for _ in range(n - 1):
            self.tok = self.model.decode_step(self.tok, self.cache).argmax(-1)
            stamps.append(time.perf_counter())
        return stamps

    def reserve(self, positions: int) -> None:
        """Grow every global KV cache to ``positions`` slots (as ``init_cache`` sizes them)."""
        from blocks.common import KVCache

        def walk(x):
            if isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v)
            elif isinstance(x, KVCache):
                x.reserve(positions)
        walk(self.cache.states)

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes


class _Stamp:
    """A LogitsProcessor that records when it is called (once per new token, right after
    the forward that made its logits)."""

    def __init__(self):
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


class HFSide:
    """Hugging Face at one (context, batch): a DynamicCache holding the context, then rounds
    of ``model.generate`` continuing from it."""

    def __init__(self, model, ids, ctx):
        self.model = model
        t0 = time.perf_counter()
        with torch.no_grad():
            self.cache = hf_context(model, ids, ctx)
        self.build_s = time.perf_counter() - t0
        self.linear_only = all(getattr(self.cache, "is_linear", [False]))
        nxt = ids[:, -1:]
        if self.linear_only:        # generate cannot tell what the cache holds: the new token
            self.prompt = nxt
        else:                       # the context plus the new token; generate runs only that
            self.prompt = torch.cat([_tile(ids[:, None, :, None], ctx)[:, 0, :, 0], nxt], 1)

    @torch.no_grad()
    def round(self, n: int) -> list[float]:
        from transformers import LogitsProcessorList
        stamp = _Stamp()
        out = self.model.generate(
            self.prompt, attention_mask=torch.ones_like(self.prompt), cache=self.cache,
            do_sample=False, min_new_tokens=n, max_new_tokens=n,
            logits_processor=LogitsProcessorList([stamp]), pad_token_id=0, eos_token_id=None,
            use_cache=True)
        assert len(stamp.t) == n and out.shape[1] == self.prompt.shape[1] + n
        self.prompt = out[:, -1:] if self.linear_only else out
        return stamp.t

    @property
    def nbytes(self) -> int:
        return hf_cache_bytes(self.cache)


CONTENDED = 0.25   # cores used by other processes during a row that make it suspect


class OtherCPU:
    """CPU time the rest of the machine spends from now on, in cores (Linux /proc/stat
    against this process's own CPU time): other processes on a 2-core machine inflate the
    latencies of a 2-thread model several-fold."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float | None:
        try:
            f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def cores(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        return round(max(0.0, (busy - self.busy0) - (self._own() - self.own0)) / wall, 3)


def measure(ours, hf, ids, ctx, steps, warmup, rounds, max_rounds, min_time) -> dict:
    """One (case, context, batch): both sides' contexts, then alternating rounds (hycomp, HF,
    hycomp, HF, ...) of warmup + steps + 1 new tokens each: at least ``rounds``, more (up to
    ``max_rounds``) until each side's rounds add up to ``min_time`` seconds. ms/token is the
    median of the gaps of all rounds, each round's first ``warmup`` gaps dropped."""
    n = steps + warmup + 1
    B, R = ids.shape
    row = {"batch": B, "context": ctx, "real": R, "hf_ms": None, "hf_bytes": None,
           "hf_build_s": None, "hf_gaps_ms": None}
    sides = {"hycomp": HycompSide(ours, ids, ctx, ctx + rounds * n)}
    if hf is not None:
        sides["hf"] = HFSide(hf, ids, ctx)
    gaps = {k: [] for k in sides}
    want, done = rounds, 0
    while done < want:
        slowest = 0.0
        for k, side in sides.items():
            stamps = side.round(n)
            gaps[k] += _gaps(stamps, warmup)
            slowest = max(slowest, stamps[-1] - stamps[0])
        done += 1
        if done == 1:
            want = min(max(rounds, max_rounds), max(rounds, math.ceil(min_time / slowest)))
            if want > rounds:   # room for the extra rounds, untimed (so nothing grows in them)
                sides["hycomp"].reserve(ctx + want * n)
    row["rounds"] = done
    for k, side in sides.items():
        row[f"{k}_ms"] = statistics.median(gaps[k]) * 1e3
        row[f"{k}_bytes"] = side.nbytes
        row[f"{k}_build_s"] = round(side.build_s, 2)
        row[f"{k}_gaps_ms"] = [round(g * 1e3, 3) for g in gaps[k]]
    return row


def prefill_rates(model, T: int, reps: int, chunk: int) -> dict:
    """tokens/s of prefill (one chunk; chunks of ``chunk``) and of a training forward, batch 1,
    median of ``reps`` interleaved runs after one warm-up each."""
    ids = torch.randint(0, V, (1, T))

    def pre(cs):
        def f():
            with torch.no_grad():
                model.prefill(ids, model.init_cache(1, T), chunk_size=cs)
        return f

    def fwd():
        with torch.enable_grad():
            out = model(ids)
            del out
    fns = {"prefill": pre(None), f"prefill_chunk{chunk}": pre(chunk), "forward": fwd}
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: T / statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------------------------
# targets, tables, plot
# --------------------------------------------------------------------------------------------
def targets(st: dict) -> list[tuple[str, str, bool]]:
    rows, out = st["rows"], []
    by = {}
    for r in rows:
        by.setdefault((r["case"], r["batch"]), {})[r["context"]] = r
    for r in rows:
        if r["hf_ms"] is not None:
            sp = r["hf_ms"] / r["hycomp_ms"]
            out.append((f"{r['case']} ctx {fmt_ctx(r['context'])} batch {r['batch']}: "
                        f"HF ms / hycomp ms >= 2",
                        f"{sp:.2f}x ({r['hycomp_ms']:.2f} vs {r['hf_ms']:.2f} ms)", sp >= 2))
    for (case, B), per in by.items():
        kind = GEN_CASES.get(case, (None, None, st.get("kinds", {}).get(case)))[2]
        ctxs = sorted(per)
        if len(ctxs) < 2:
            continue
        # the range starts at 512 (a window of 512 is full from there on)
        big = [c for c in ctxs if c >= 512]
        base = big[0] if len(big) >= 2 else ctxs[0]
        lo, hi = per[base], per[ctxs[-1]]
        span = f"{fmt_ctx(ctxs[-1])} / {fmt_ctx(base)}"
        if kind == "flat":
            r = hi["hycomp_ms"] / lo["hycomp_ms"]
            out.append((f"{case} batch {B}: ms/token {span} <= 1.2", f"{r:.2f}x", r <= 1.2))
            held = [c for c in ctxs if c >= base]
            sizes = [per[c]["hycomp_bytes"] for c in held]
            out.append((f"{case} batch {B}: cache bytes constant from {fmt_ctx(base)} to "
                        f"{fmt_ctx(ctxs[-1])}",
                        " / ".join(dict.fromkeys(fmt_bytes(b) for b in sizes)),
                        len(set(sizes)) == 1))
        else:
            worst, where = 0.0, ""
            for a, b in zip(ctxs, ctxs[1:]):
                t = per[b]["hycomp_ms"] / per[a]["hycomp_ms"]
                m = per[b]["hycomp_bytes"] / per[a]["hycomp_bytes"]
                if t / m > worst:
                    worst, where = t / m, (f"{fmt_ctx(a)}->{fmt_ctx(b)}: time x{t:.2f}, "
                                           f"cache x{m:.2f}")
            out.append((f"{case} batch {B}: time/token grows no faster than the cache "
                        "(each step of context)", where, worst <= 1.0))
    for p in st.get("prefill", []):
        r = p["prefill_chunked"] / p["forward"]
        out.append((f"{p['case']} T={p['T']}: prefill (chunks of {PREFILL_CHUNK}) tok/s >= "
                    "training forward / 1.2",
                    f"{r:.2f}x of forward ({fmt_rate(p['prefill_chunked'])} vs "
                    f"{fmt_rate(p['forward'])} tok/s; one chunk "
                    f"{p['prefill'] / p['forward']:.2f}x)", r >= 1 / 1.2))
    return out


def fmt_ctx(c: int) -> str:
    return f"{c // 1024}k" if c >= 1024 and c % 1024 == 0 else str(c)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def fmt_rate(tps: float) -> str:
    return f"{tps / 1000:.1f}k"


def render(st: dict, plot_name: str | None) -> str:
    s = st["settings"]
    lines = [MARK_BEGIN, "## Generation", "",
             f"Machine: {st['machine']}, {st['threads']} threads (torch default); torch "
             f"{st['torch']}, transformers {st['transformers']}; Python {st['python']}; "
             f"measured {st['date']} (wall {st['wall_s']:.0f} s; 1-minute load average "
             f"{st['loadavg_1min']['start']:.1f} at the start, {st['loadavg_1min']['end']:.1f} at "
             f"the end; the benchmark itself adds about {st['threads']}). Made by "
             "`python tools/bench_generate.py` (fp32, no_grad, "
             f"d_model {D}, {L} layers, vocab {V}; glibc allocator tuning "
             f"{'on' if st['tuned'] else 'off'} for both sides). Raw numbers: "
             "`docs/generate_bench.json`.", ""]
    for run in st.get("runs", [])[1:]:
        lines += [f"Re-measured on {run['date']} (wall {run['wall_s']:.0f} s, load "
                  f"{run['loadavg_1min']['start']:.1f} / {run['loadavg_1min']['end']:.1f}): "
                  + ", ".join(run["rows"]) + ".", ""]
    rmax = s.get("max_rounds", s.get("rounds", 1))
    lines += [f"ms/token: median gap between consecutive new tokens, greedy, over rounds of "
              f"{s['steps']} decode steps (after {s['warmup']} dropped at the start of every "
              "round); the sides alternate (hycomp, HF, hycomp, HF, ...) on contexts each "
              f"built once, {s.get('rounds', 1)} rounds each at least, more (up to {rmax}) "
              f"until a side's rounds add up to {s.get('min_time', 0):g} s, so the context "
              f"grows by up to {rmax * (s['steps'] + s['warmup'] + 1)} tokens while measured "
              "(the column *rounds*). hycomp: `model.prefill`, then "
             "`model.decode_step` + argmax in a loop. HF: its own `model.generate(do_sample="
             "False, min_new_tokens=N, max_new_tokens=N)` continuing from a `DynamicCache` "
             "that holds the context, each token time-stamped by a `LogitsProcessor`; both "
             "in one process. Cache: hycomp `cache.nbytes`, HF the bytes of the tensors in its "
             "cache object, both after the last round (context + new tokens).", "",
             f"Context: the first R = min(context, max({s['real_tokens']} / batch, 512)) "
             f"positions are real (random) tokens, prefilled in chunks of {PREFILL_CHUNK} (hycomp "
             "`model.prefill`, HF its forward with the cache); the rest is synthetic: each "
             "global-attention KV cache is extended to the context with copies of its real "
             "keys and values (position p holds those of p mod R) and the position counters "
             "advanced; a sliding-window cache (full after R >= 512) only has its position "
             "moved; Mamba-2 and Gated DeltaNet states are fixed-size and stay as the prefix "
             "left them. A decode step's work depends on what the cache holds, not on how it "
             "was filled. The column *real* gives R. HF's `generate` gets the context plus "
             "one token as prompt and runs only that one (the cache holds the rest); for the "
             "all-recurrent caches (Mamba-2, Gated DeltaNet), where `generate` cannot tell "
             "what the cache holds, only the one token (its per-step bookkeeping then grows "
             "with the new tokens, not the context: in HF's favour).", "",
             "Noise: on this shared 2-core machine a step of 2-5 ms varies by about 10-15% "
             "between runs (more when other processes run: see the load average above), so "
             "the flatness targets (1.2x) and ratios near 2x can flip between runs; the two "
             "sides of one row are measured alternately, so their ratio is steadier than "
             "either number.", "",
             "Gated DeltaNet on the HF side is `Qwen3NextForCausalLM` with only linear-attention "
             "layers. Its forward asks the cache for `get_seq_length()` and `get_mask_sizes()`, "
             "which a `DynamicCache` of linear-attention layers alone refuses, so HF cannot "
             "decode this model with a cache (`use_cache=False` would recompute the whole "
             "sequence per token). Here it gets a `DynamicCache` subclass that reports the "
             "tokens seen, as an attention layer would; its logits were checked equal to a "
             "no-cache recompute. HF's Mamba-2 and Bamba run their PyTorch paths "
             "(no `mamba_ssm` / `causal_conv1d` kernels on this CPU).", "",
             "Hybrid: `MMM*` (three Mamba-2 layers, then global attention with RoPE on half "
             "of each head, SwiGLU MLP after every mixer) against `BambaForCausalLM` with "
             "`attn_layer_indices=[3]` (same parameter count).", ""]
    tg = targets(st)
    met = sum(ok for *_, ok in tg)
    lines += [f"### Targets ({met} of {len(tg)} met in these measurements)", ""]
    speed = [r for r in st["rows"] if r["hf_ms"]]
    if speed:
        ctxs = sorted({r["context"] for r in speed})
        fast = sum(r["hf_ms"] >= 2 * r["hycomp_ms"] for r in speed)
        lines += [f"Every case at least 2x faster per token than HF ({fast} of {len(speed)} "
                  "met): HF ms / hycomp ms, **bold** where under 2.", "",
                  "| case | batch | " + " | ".join(fmt_ctx(c) for c in ctxs) + " |",
                  "|---|---|" + "---|" * len(ctxs)]
        cells = {(r["case"], r["batch"], r["context"]): r["hf_ms"] / r["hycomp_ms"]
                 for r in speed}
        for case, B in dict.fromkeys((r["case"], r["batch"]) for r in speed):
            vals = [cells.get((case, B, c)) for c in ctxs]
            lines.append(f"| {case} | {B} | " + " | ".join(
                "—" if v is None else (f"{v:.2f}x" if v >= 2 else f"**{v:.2f}x**")
                for v in vals) + " |")
        lines += [""]
    rest = [t for t in tg if "HF ms / hycomp ms" not in t[0]]
    lines += ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in rest]
    lines += ["", "### ms per new token and cache memory", ""]
    if plot_name:
        lines += [f"![ms/token and cache bytes against context]({plot_name})", ""]
    lines += ["| case | batch | context | real | rounds | hycomp ms/tok | HF ms/tok "
              "| HF / hycomp | hycomp cache | HF cache |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in st["rows"]:
        sp = f"{r['hf_ms'] / r['hycomp_ms']:.2f}x" if r["hf_ms"] else "—"
        hf = f"{r['hf_ms']:.2f}" if r["hf_ms"] else "—"
        busy = (r.get("others_cores") or 0) > CONTENDED
        lines.append(f"| {r['case']} | {r['batch']} | {fmt_ctx(r['context'])}"
                     f"{' †' if busy else ''} "
                     f"| {fmt_ctx(r['real'])} | {r.get('rounds', '—')} "
                     f"| {r['hycomp_ms']:.2f} | {hf} | {sp} "
                     f"| {fmt_bytes(r['hycomp_bytes'])} | {fmt_bytes(r['hf_bytes'])} |")
    busy = [r for r in st["rows"] if (r.get("others_cores") or 0) > CONTENDED]
    if busy:
        lines += ["", f"† other processes used more than {CONTENDED} cores while this row was "
                  "measured (after the retries): its times are inflated."]
    if st.get("prefill"):
        lines += ["", f"### Prefill against a training forward (batch 1, median of "
                  f"{s['prefill_reps']})", "",
                  "Training forward: `model(input_ids)` with autograd on (all logits). "
                  "Prefill: `model.prefill` under no_grad, last logits only, in one chunk and "
                  f"in chunks of {PREFILL_CHUNK} (what `generate` does); the target is on "
                  "the latter.", "",
                  "| case | T | prefill tok/s (one chunk) | prefill tok/s (chunks of "
                  f"{PREFILL_CHUNK}) | training forward tok/s | chunked prefill / forward |",
                  "|---|---|---|---|---|---|"]
        for p in st["prefill"]:
            lines.append(f"| {p['case']} | {p['T']} | {fmt_rate(p['prefill'])} "
                         f"| {fmt_rate(p['prefill_chunked'])} | {fmt_rate(p['forward'])} "
                         f"| {p['prefill_chunked'] / p['forward']:.2f}x |")
    lines += [MARK_END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the marked section of ``path`` (or append it): the rest is left as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARK_BEGIN in text and MARK_END in text:
        a = text.index(MARK_BEGIN)
        b = text.index(MARK_END) + len(MARK_END)
        text = text[:a] + section.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text if text.endswith("\n") else text + "\n")


def plot(st: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted({r["batch"] for r in st["rows"]})
    cases = list(dict.fromkeys(r["case"] for r in st["rows"]))
    fig, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 8.5), squeeze=False)
    colors = dict(zip(cases, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for j, B in enumerate(batches):
        for case in cases:
            rs = sorted((r for r in st["rows"] if r["case"] == case and r["batch"] == B),
                        key=lambda r: r["context"])
            if not rs:
                continue
            x = [r["context"] for r in rs]
            c = colors[case]
            for i, (key, unit) in enumerate((("ms", 1), ("bytes", 1 << 20))):
                ax = axes[i][j]
                ax.plot(x, [r[f"hycomp_{key}"] / unit for r in rs], "-o", color=c,
                        label=f"{case} hycomp")
                if any(r[f"hf_{key}"] for r in rs):
                    ax.plot(x, [r[f"hf_{key}"] / unit if r[f"hf_{key}"] else float("nan")
                                for r in rs], "--x", color=c, label=f"{case} HF")
        ctxs = sorted({r["context"] for r in st["rows"]})
        for i, yl in enumerate(("ms per new token", "cache MiB")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ctxs, [fmt_ctx(c) for c in ctxs])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(yl)
            ax.set_title(f"batch {B}: {yl} (solid hycomp, dashed HF)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Generation, d_model {D}, {L} layers, fp32, {st['machine']}, "
                 f"{st['threads']} threads, {st['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
def profile_step(case: str, ctx: int, batch: int, real_tokens: int, top: int = 25) -> str:
    """cProfile of hycomp decode steps of one case at one (context, batch)."""
    import cProfile
    import io
    import pstats
    model, _ = hycomp_model(GEN_CASES[case][0])
    model.eval()
    R = real_length(ctx, batch, real_tokens)
    ids = torch.randint(0, V, (batch, R))
    with torch.no_grad():
        cache, logits = hycomp_context(model, ids, ctx, ctx + 40)
        tok = logits.argmax(-1)
        for _ in range(5):
            tok = model.decode_step(tok, cache).argmax(-1)
        t0 = time.perf_counter()
        for _ in range(20):
            tok = model.decode_step(tok, cache).argmax(-1)
        wall = (time.perf_counter() - t0) / 20
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                tok = model.decode_step(tok, cache).argmax(-1)
        ev = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        calls = sum(e.count for e in ev) / 20
        aten_self = sum(e.self_cpu_time_total for e in ev) / 20 / 1e3
        top_ops = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:8]
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            tok = model.decode_step(tok, cache).argmax(-1)
        pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    head = (f"one decode step: {wall * 1e3:.2f} ms wall; {calls:.0f} aten ops, whose self "
            f"time sums to {aten_self:.2f} ms under the torch profiler (the rest is Python "
            "and dispatch); heaviest ops per step: "
            + ", ".join(f"{e.key} {e.self_cpu_time_total / 20 / 1e3:.3f} ms x{e.count / 20:.0f}"
                        for e in top_ops) + "\n")
    return (f"{case} ctx {ctx} batch {batch}: " + head
            + "cProfile of 20 decode steps:\n" + s.getvalue())


LOCK = Path(os.environ.get("TMPDIR", "/tmp")) / "hycomp_bench_generate.lock"


def _one_at_a_time():
    """An exclusive lock on :data:`LOCK`, waited for: two benchmarks on a 2-core machine
    would time each other. Returns the open file (the lock lasts while it is open)."""
    import fcntl
    f = open(LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        print(f"waiting for another tools/bench_generate.py run ({f.read().strip()}) to end",
              file=sys.stderr, flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}, since {datetime.datetime.now():%H:%M:%S}")
    f.flush()
    return f


def _merge(old: dict, new: dict) -> dict:
    """``new`` plus the rows and prefill rows of ``old`` it did not re-measure."""
    keys = ("machine", "threads", "torch", "transformers", "tuned")
    if any(old.get(k) != new[k] for k in keys):
        print("not merging: the stored run differs in " + ", ".join(
            k for k in keys if old.get(k) != new[k]), file=sys.stderr)
        return new
    summary = _run_summary(new)
    done = {(r["case"], r["batch"], r["context"]) for r in new["rows"]}
    new["rows"] = [r for r in old["rows"] if (r["case"], r["batch"], r["context"]) not in done
                   ] + new["rows"]
    order = {c: i for i, c in enumerate(GEN_CASES)}
    new["rows"].sort(key=lambda r: (order.get(r["case"], 99), r["batch"], r["context"]))
    again = {p["case"] for p in new["prefill"]}
    new["prefill"] = [p for p in old["prefill"] if p["case"] not in again] + new["prefill"]
    new["prefill"].sort(key=lambda p: order.get(p["case"], 99))
    new["kinds"] = {**old.get("kinds", {}), **new["kinds"]}
    runs = old.get("runs", [_run_summary(old)])
    # a re-measurement whose rows are all measured again now no longer shows in the numbers
    runs = runs[:1] + [r for r in runs[1:] if not set(r["rows"]) <= set(summary["rows"])]
    new["runs"] = runs + [summary]
    for k in ("date", "wall_s", "loadavg_1min"):   # the header describes the first run
        new[k] = old[k]
    return new


def _run_summary(st: dict) -> dict:
    return {"date": st["date"], "wall_s": st["wall_s"], "loadavg_1min": st["loadavg_1min"],
            "rows": sorted({f"{r['case']}/b{r['batch']}" for r in st["rows"]})}


def _write(st: dict, args) -> int:
    """Print the targets; write the JSON, the plot and the Markdown section."""
    tg = targets(st)
    print(f"\ntargets ({sum(ok for *_, ok in tg)} of {len(tg)} met):", file=sys.stderr)
    for t, m, ok in tg:
        print(f"  [{'met' if ok else 'MISSED'}] {t}: {m}", file=sys.stderr)
    if args.json and not args.render:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(st, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    plot_name = None
    if args.plot:
        plot(st, Path(args.plot))
        print(f"wrote {args.plot}", file=sys.stderr)
        if args.out != "-":
            plot_name = os.path.relpath(args.plot, Path(args.out).resolve().parent)
    section = render(st, plot_name)
    if args.out == "-":
        print(section)
    else:
        write_section(Path(args.out), section)
        print(f"wrote the Generation section of {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(GEN_CASES), choices=list(GEN_CASES))
    ap.add_argument("--contexts", nargs="*", type=int, default=None,
                    help="context lengths (default 512 4096 16384 32768)")
    ap.add_argument("--batches", nargs="*", type=int, default=None, help="default 1 8")
    ap.add_argument("--steps", type=int, default=None,
                    help="decode steps timed per round (default 24), after --warmup")
    ap.add_argument("--warmup", type=int, default=None,
                    help="steps dropped at the start of every round (default 3)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="least alternating rounds per side and (context, batch) (default 2)")
    ap.add_argument("--max-rounds", type=int, default=None,
                    help="most rounds, added while a side's rounds take under --min-time "
                         "(default 8)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="seconds of rounds per side wanted (default 0.6)")
    ap.add_argument("--real-tokens", type=int, default=None,
                    help="real tokens prefilled per context: batch x R <= this, R >= 512 "
                         "(default 32768); the rest of a context is synthetic")
    ap.add_argument("--prefill-length", type=int, default=None, help="default 4096; 0: skip")
    ap.add_argument("--prefill-reps", type=int, default=None, help="default 5")
    ap.add_argument("--retries", type=int, default=None,
                    help="measure a row again (up to this many times) when other processes "
                         f"used more than {CONTENDED} cores meanwhile (default 2; --quick: 0)")
    ap.add_argument("--retry-wait", type=float, default=20.0,
                    help="seconds to wait before such a retry")
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="hycomp only")
    ap.add_argument("--no-tune-allocator", dest="tune", action="store_false",
                    help="leave glibc malloc as it is (default: tools/bench.py's tuning, "
                         "composer/run/runtime.py, for both sides)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny settings (< 1 min) that print to stdout and write nothing "
                         "unless --out/--json/--plot are given")
    ap.add_argument("--out", default=None,
                    help="markdown file whose 'Generation' section to write, or - for stdout "
                         "(default docs/benchmarks.md; --quick: -)")
    ap.add_argument("--json", default=None,
                    help="raw numbers (default docs/generate_bench.json; --quick: none)")
    ap.add_argument("--plot", default=None,
                    help="plot file (default docs/generate_bench.png; --quick: none)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --json that this run does not measure (same "
                         "machine, torch and transformers): to re-measure a few rows")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: rewrite the section and plot from --json")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, cProfile hycomp's decode steps where hycomp is "
                         "slowest against HF (or slowest outright)")
    args = ap.parse_args(argv)
    q = args.quick
    dflt = {"contexts": [32, 544] if q else [512, 4096, 16384, 32768],
            "batches": [1, 2] if q else [1, 8], "steps": 3 if q else 24,
            "warmup": 1 if q else 3, "rounds": 1 if q else 2,
            "max_rounds": 1 if q else 8, "min_time": 0.0 if q else 0.6,
            "real_tokens": 512 if q else 32768,
            "retries": 0 if q else 2, "prefill_length": 128 if q else 4096,
            "prefill_reps": 1 if q else 5}
    for k, v in dflt.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = "-" if q else str(ROOT / "docs" / "benchmarks.md")
    if args.json is None:
        args.json = "" if q else str(ROOT / "docs" / "generate_bench.json")
    if args.plot is None:
        args.plot = "" if q else str(ROOT / "docs" / "generate_bench.png")

    if args.render:
        st = json.loads(Path(args.json).read_text())
        return _write(st, args)
    _lock = _one_at_a_time()  # noqa: F841  (held until the process exits)
    if os.getloadavg()[0] > 1.0:
        print(f"warning: 1-minute load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs: other processes compete for the cores and per-token "
              "latencies will be inflated", file=sys.stderr)
    torch.manual_seed(0)
    tuned = False
    if args.tune:
        from composer.run.runtime import tune_cpu_allocator
        tuned = tune_cpu_allocator()
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    load0 = os.getloadavg()
    rows, prefill, t_start = [], [], time.perf_counter()
    for case in args.cases:
        cfg, hf_build, _ = GEN_CASES[case]
        ours, _ = hycomp_model(cfg)
        ours.eval()
        hf = hf_build_model(hf_build) if args.hf else None
        for B in args.batches:
            for ctx in args.contexts:
                R = real_length(ctx, B, args.real_tokens)
                ids = torch.randint(0, V, (B, R))
                for attempt in range(args.retries + 1):
                    others = OtherCPU()
                    row = {"case": case, **measure(ours, hf, ids, ctx, args.steps,
                                                   args.warmup, args.rounds, args.max_rounds,
                                                   args.min_time)}
                    row["others_cores"] = others.cores()
                    if row["others_cores"] is None or row["others_cores"] <= CONTENDED:
                        break
                    print(f"{case} B={B} ctx={ctx}: other processes used "
                          f"{row['others_cores']:.2f} cores meanwhile; measuring again",
                          file=sys.stderr, flush=True)
                    time.sleep(args.retry_wait)
                row["load1"] = round(os.getloadavg()[0], 2)
                row["when"] = datetime.datetime.now().isoformat(timespec="seconds")
                rows.append(row)
                ms, nb, build = row["hycomp_ms"], row["hycomp_bytes"], row["hycomp_build_s"]
                print(f"{case:15s} B={B} ctx={ctx:6d} real={R:6d}  hycomp {ms:7.2f} ms/tok "
                      f"{fmt_bytes(nb):>10s}"
                      + (f"  HF {row['hf_ms']:7.2f} ms/tok {fmt_bytes(row['hf_bytes']):>10s}"
                         f"  HF/hycomp {row['hf_ms'] / ms:5.2f}x" if hf is not None else "")
                      + f"  [build {build:.1f}s"
                      + (f" / {row['hf_build_s']:.1f}s" if hf is not None else "")
                      + f", t={time.perf_counter() - t_start:.0f}s]", file=sys.stderr,
                      flush=True)
        if args.prefill_length:
            for attempt in range(args.retries + 1):
                others = OtherCPU()
                r = prefill_rates(ours, args.prefill_length, args.prefill_reps, PREFILL_CHUNK)
                busy = others.cores()
                if busy is None or busy <= CONTENDED:
                    break
                print(f"{case} prefill: other processes used {busy:.2f} cores meanwhile; "
                      "measuring again", file=sys.stderr, flush=True)
                time.sleep(args.retry_wait)
            prefill.append({"case": case, "T": args.prefill_length, "prefill": r["prefill"],
                            "prefill_chunked": r[f"prefill_chunk{PREFILL_CHUNK}"],
                            "forward": r["forward"], "others_cores": busy})
            print(f"{case:15s} prefill T={args.prefill_length}: one chunk "
                  f"{r['prefill']:.0f} tok/s, chunks of {PREFILL_CHUNK} "
                  f"{r[f'prefill_chunk{PREFILL_CHUNK}']:.0f} tok/s, training forward "
                  f"{r['forward']:.0f} tok/s", file=sys.stderr, flush=True)
        del ours, hf

    st = {"machine": bench._cpu_name(), "threads": torch.get_num_threads(),
          "torch": torch.__version__, "transformers": transformers.__version__,
          "python": platform.python_version(), "tuned": tuned,
          "date": datetime.datetime.now().isoformat(timespec="minutes"),
          "wall_s": round(time.perf_counter() - t_start, 1),
          "loadavg_1min": {"start": round(load0[0], 2), "end": round(os.getloadavg()[0], 2)},
          "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                       "max_rounds": args.max_rounds, "min_time": args.min_time,
                       "real_tokens": args.real_tokens, "prefill_chunk": PREFILL_CHUNK,
                       "prefill_reps": args.prefill_reps, "quick": q,
                       "pid": os.getpid()},
          "kinds": {c: GEN_CASES[c][2] for c in args.cases},
          "rows": rows, "prefill": prefill}
    if args.merge and args.json and Path(args.json).exists():
        st = _merge(json.loads(Path(args.json).read_text()), st)
    _write(st, args)
    if args.profile and rows:
        worst = max(rows, key=lambda r: (r["hycomp_ms"] / r["hf_ms"]) if r["hf_ms"]
                    else r["hycomp_ms"])
        print(profile_step(worst["case"], worst["context"], worst["batch"], args.real_tokens),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
