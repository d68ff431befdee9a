"""Generation from a :class:`~composer.build.model.ComposedModel`: caches, prefill, decode,
sampling.

The three block modes make this short. A prompt is *prefilled* with the whole-sequence forms
(the chunked scans, one attention call), in chunks of ``prefill_chunk_size`` tokens so that the
memory of a long prompt stays bounded; each new token is a *decode step*, a length-1 forward
that every block runs in its single-step form (the ops' ``step`` backends, the KV cache's
in-place write). The per-block state lives in a :class:`ModelCache`.

Ragged batches. Prompts of different lengths share a batch without padding: all rows are
prefilled on the length of the shortest prompt, then every decode step feeds each row its own
next token, the rest of its prompt first (teacher-forced, its logits unused) and its
generated tokens after. All rows stay at the same position, so every block family works
unchanged (a recurrent state cannot skip a padding token, and block-local or sparse attention
depend on absolute positions), and each row computes exactly what it would alone. The cost:
the ragged tail of a prompt runs token by token.

Sampling follows Hugging Face's ``generate`` (transformers' logits processors):
temperature, then top-k, then top-p, then a draw from the softmax; greedy takes the argmax.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from composer.core.block import state_leaves, state_nbytes


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------
@dataclass
class ModelCache:
    """The state of every sequence-mixing node of a model for one batch of sequences.

    ``states``: node id -> that block's state (the dict ``ComposedModel.forward`` takes);
    ``pos``: tokens processed so far. Shared blocks keep one state per visit (one node each),
    parallel sub-layers one per branch (each branch is a node).
    """

    states: dict[str, Any]
    pos: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of every state tensor and cache buffer."""
        return state_nbytes(self.states)

    def node_bytes(self) -> dict[str, int]:
        """Bytes per node (layer graph node id)."""
        return {nid: state_nbytes(st) for nid, st in self.states.items()}


def reserve_caches(state: Any, positions: int) -> None:
    """Preallocate every KV cache inside a (nested) block state for ``positions`` tokens."""
    for x in state_leaves(state):
        if hasattr(x, "reserve"):
            x.reserve(positions)


def init_cache(model, batch: int, capacity: int | None = None, device=None,
               dtype: torch.dtype | None = None) -> ModelCache:
    """An empty cache for ``batch`` sequences; ``capacity``: total tokens (prompt + new ones)
    to preallocate every global KV cache for, so that no step copies it (it still grows by
    doubling past that)."""
    p = model.embed.weight
    states = model.init_state(batch, device or p.device, dtype or p.dtype)
    if capacity:
        reserve_caches(states, capacity)
    return ModelCache(states)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache: ModelCache,
            chunk_size: int | None = None) -> torch.Tensor:
    """Run ``input_ids`` (B, T), T >= 1, through the model on top of ``cache`` (updated in
    place) in chunks of at most ``chunk_size`` tokens (None: one chunk). Returns the logits of
    the last position, (B, V)."""
    T = input_ids.shape[1]
    if T < 1:
        raise ValueError("prefill needs at least one token")
    step = chunk_size or T
    logits = None
    for a in range(0, T, step):
        logits, cache.states = model(input_ids[:, a:a + step], state=cache.states,
                                     return_state=True, logits_to_keep=1)
        cache.pos += min(step, T - a)
    return logits[:, -1]


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, cache: ModelCache) -> torch.Tensor:
    """One new token per row, ``tokens`` (B,), on top of ``cache`` (updated in place).
    Returns the logits of the next position, (B, V)."""
    logits, cache.states = model(tokens[:, None], state=cache.states, return_state=True,
                                 logits_to_keep=1)
    cache.pos += 1
    return logits[:, -1]


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (Hugging Face's ``generate`` names and meanings).

    ``do_sample`` False: greedy (the argmax). Else, in this order: divide the logits by
    ``temperature`` (0 means greedy); keep the ``top_k`` largest (0: all; ties with the k-th
    are kept); keep the smallest set of most likely tokens whose probabilities sum to at least
    ``top_p`` (1: all); draw from the softmax of what is left.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    def problems(self) -> list[tuple[str, Any, str, str]]:
        """(name, value, why, fix) for settings out of range; empty when all are valid."""
        out = []
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            out.append(("temperature", self.temperature, "must be a finite number >= 0",
                        "use e.g. 0.8 (lower: more predictable; 0: greedy)"))
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            out.append(("top_k", self.top_k, "must be a whole number >= 0",
                        "use e.g. 50, or 0 to keep every token"))
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            out.append(("top_p", self.top_p, "must lie in (0, 1]",
                        "use e.g. 0.95, or 1 to keep every token"))
        return out

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def warp_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``logits`` (B, V) in float32: removed tokens
    get -inf."""
    x = logits.float() / s.temperature
    V = x.shape[-1]
    if 0 < s.top_k < V:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if s.top_p < 1:
        srt, idx = torch.sort(x, dim=-1, descending=True)
        probs = srt.softmax(-1)
        # drop a token when the more likely ones before it already reach top_p (the first is
        # always kept)
        drop = (probs.cumsum(-1) - probs) >= s.top_p
        x = x.masked_fill(drop.scatter(-1, idx, drop), -math.inf)
    return x


def choose(logits: torch.Tensor, s: Sampling,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token per row, (B,), from logits (B, V)."""
    if s.greedy:
        return logits.argmax(-1)
    probs = warp_logits(logits, s).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def position_limit(model) -> int | None:
    """The most tokens a sequence may hold: the model's ``max_seq_len`` when some block keeps a
    cache that grows with the context (global attention: its positions were trained up to
    there), else None (fixed-size states and windows run on)."""
    L = getattr(model, "max_seq_len", None)
    if not L:
        return None
    grows = any(a["state_bytes"](2 * L) > a["state_bytes"](L)
                for _, a in model.graph.nodes(data=True) if "state_bytes" in a)
    return L if grows else None


@dataclass
class Generation:
    """One batched generation; iterate to run it step by step.

    Each iteration yields, per row, the token generated at this step or None (the row is
    still reading its prompt, or finished: it reached ``max_new_tokens`` or emitted an
    ``eos_token_id``). Afterwards ``new_tokens[b]`` holds row b's generated tokens, and the
    timings: ``prefill_s`` (the prefill of the common prefix), ``step_s`` (seconds of each
    decode step).
    """

    model: Any
    prompts: list[list[int]]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    eos_token_id: Sequence[int] | int | None = None
    generator: torch.Generator | None = None
    prefill_chunk_size: int | None = 2048
    new_tokens: list[list[int]] = field(init=False)
    prefill_s: float = field(init=False, default=0.0)
    step_s: list[float] = field(init=False, default_factory=list)
    cache: ModelCache | None = field(init=False, default=None)

    def __post_init__(self):
        if not self.prompts or any(len(p) == 0 for p in self.prompts):
            raise ValueError("every prompt needs at least one token")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        eos = self.eos_token_id
        self._eos = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
        self.new_tokens = [[] for _ in self.prompts]

    @property
    def finished(self) -> list[bool]:
        return [len(t) >= self.max_new_tokens or bool(t and t[-1] in self._eos)
                for t in self.new_tokens]

    def __iter__(self) -> Iterator[list[int | None]]:
        model, prompts = self.model, self.prompts
        if self.max_new_tokens == 0:
            return
        dev = model.embed.weight.device
        lens = [len(p) for p in prompts]
        m, longest = min(lens), max(lens)
        self.cache = init_cache(model, len(prompts), capacity=longest + self.max_new_tokens)
        head = torch.tensor([p[:m] for p in prompts], dtype=torch.long, device=dev)
        t0 = time.perf_counter()
        logits = prefill(model, head, self.cache, self.prefill_chunk_size)
        self.prefill_s = time.perf_counter() - t0
        pos = m                      # the position whose token the logits predict
        while True:
            picked = choose(logits, self.sampling, self.generator).tolist()
            out: list[int | None] = []
            feed = []
            done = self.finished
            for b, p in enumerate(prompts):
                if pos < lens[b]:                      # still reading its prompt
                    out.append(None)
                    feed.append(p[pos])
                elif done[b]:
                    out.append(None)
                    feed.append(self.new_tokens[b][-1])
                else:
                    self.new_tokens[b].append(picked[b])
                    out.append(picked[b])
                    feed.append(picked[b])
            yield out
            if all(self.finished):
                return
            t0 = time.perf_counter()
            logits = decode_step(model, torch.tensor(feed, device=dev), self.cache)
            self.step_s.append(time.perf_counter() - t0)
            pos += 1

    def run(self, on_step: Callable[[list[int | None]], None] | None = None) -> "Generation":
        """Run to the end; ``on_step`` sees each step's tokens (for streaming)."""
        for toks in self:
            if on_step is not None:
                on_step(toks)
        return self


def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 20, *,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 50,
             top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None,
             prefill_chunk_size: int | None = 2048) -> torch.Tensor:
    """Hugging Face-style ``generate``: ``input_ids`` (B, T) -> (B, T + n), the prompts followed
    by up to ``max_new_tokens`` new tokens (n: the most any row made).

    ``attention_mask`` (B, T), 1 on prompt tokens and 0 on padding (left or right), gives
    prompts of different lengths; each row's new tokens start at column T as in Hugging
    Face's left-padded output. Rows that stop early (``eos_token_id``) are filled with
    ``pad_token_id`` (default: the first eos id, else 0). ``generator`` seeds sampling.
    """
    s = Sampling(do_sample, temperature, top_k, top_p)
    bad = s.problems()
    if bad:
        raise ValueError("; ".join(f"{n}={v!r}: {why}" for n, v, why, _ in bad))
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length >= 1), got {tuple(input_ids.shape)}")
    rows = input_ids.tolist()
    if attention_mask is not None:
        mask = attention_mask.bool().tolist()
        rows = [[t for t, keep in zip(r, mk) if keep] for r, mk in zip(rows, mask)]
    limit = position_limit(model)
    longest = max(len(r) for r in rows)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                         f"exceeds the model's {limit} positions (model.max_seq_len)")
    gen = Generation(model, rows, max_new_tokens, s, eos_token_id, generator,
                     prefill_chunk_size).run()
    n = max(len(t) for t in gen.new_tokens)
    if pad_token_id is None:
        eos = eos_token_id
        pad_token_id = (eos if isinstance(eos, int) else eos[0]) if eos not in (None, []) else 0
    out = input_ids.new_full((input_ids.shape[0], n), pad_token_id)
    for b, toks in enumerate(gen.new_tokens):
        out[b, :len(toks)] = torch.tensor(toks, dtype=out.dtype)
    return torch.cat([input_ids, out], 1)
