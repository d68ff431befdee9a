"""Synthetic task generators: token tensors for the settings of :mod:`composer.recipe.tasks`.

Every task gives ``inputs`` (n, T) and ``targets`` (n, T), int64, T = ``cfg.seq_len``, where
``targets[i, t]`` is the token the model must predict after reading ``inputs[i, :t+1]`` and
:data:`IGNORE_INDEX` marks the positions that are not scored. All randomness comes from the
``torch.Generator`` passed in, so equal generator states give equal tensors. The test set, a
fixed training set and memorization's facts each have a generator of their own, seeded from
``cfg.seed`` (:func:`_generator`): they depend on the settings and the seed alone.

Deliberate differences from the sources (``docs/tasks.md`` shows each layout):

* mqar: Zoology also asserts vocab_size > seq_len; the construction needs only
  num_pairs <= vocab_size/2 - 1, so a 256-token vocabulary runs lengths past 256 too.
* MAD's recall tasks train on the next-token loss at every position and score only the
  values; here training and test score the same positions.
* in_context_recall, noisy: the model reads all seq_len tokens of MAD's sequence (MAD feeds the
  first seq_len - 1); the extra last input, the final value, is not scored. In the noisy task
  at least one pair before the final one is a real pair (MAD picks the pair kept real among
  all pairs, the final one included).
* fuzzy_in_context_recall: the queried pair always appears before the final query (MAD inserts
  it after a random token position that the sequence may end before), at a uniformly random
  pair index.
* compression: a causal sequence instead of MAD's encoder + MLP decoder (see the settings).
"""
from __future__ import annotations

import functools
import hashlib
from typing import Literal

import torch
from torch import Tensor

from composer.core.errors import DataError
from composer.recipe.tasks import TaskData

IGNORE_INDEX = -100
"""Target of the positions that are not scored (PyTorch's cross-entropy default)."""

Split = Literal["train", "test"]

MAX_REDRAWS = 100
"""Rounds of redrawing training rows that equal a test row before giving up."""


# --------------------------------------------------------------------------------------------
# Sampling helpers
# --------------------------------------------------------------------------------------------
def _generator(seed: int, purpose: str) -> torch.Generator:
    """A generator for one purpose ("test", "train", "facts") of a data seed; the purposes
    get unrelated streams (a hash, not seed + k, so seed 1's test set is not seed 0's
    training set)."""
    digest = hashlib.sha256(f"{purpose}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _without_replacement(logits: Tensor, k: int, g: torch.Generator) -> Tensor:
    """k ids per row drawn without replacement, each draw with probability proportional to
    exp(logits) over the ids left, in draw order: logits (n, m) -> (n, k).

    Gumbel-top-k (Kool et al. 2019): the top k of ``logits + Gumbel noise`` are distributed
    as k sequential draws without replacement (what ``np.random.choice(replace=False, p=...)``
    does)."""
    u = torch.rand(logits.shape, generator=g, dtype=torch.float64)
    return torch.topk(logits - torch.log(-torch.log(u)), k, dim=-1).indices


def _distinct_small(shape: tuple[int, ...], m: int, k: int, g: torch.Generator) -> Tensor:
    """(*shape, k) tuples of k distinct ids from 0 .. m-1, uniform over ordered tuples (MAD's
    permutations). Draw i is uniform over the m - i ids left: a uniform rank, moved past the
    ids already drawn in increasing order. Memory O(k) per tuple, for small k."""
    out = torch.empty(*shape, k, dtype=torch.long)
    for i in range(k):
        x = torch.randint(m - i, shape, generator=g)
        for drawn in out[..., :i].sort(-1).values.unbind(-1):
            x += x >= drawn
        out[..., i] = x
    return out


def _first_equal(keys: Tensor) -> Tensor:
    """keys (n, M, c) -> (n, M): for each slot, the first slot of its row holding an equal key.

    Sorts each row's keys lexicographically (stable sorts, last column first, so equal keys
    keep their slot order), numbers the runs of equal keys, and sends each slot its run's
    head."""
    n, M, c = keys.shape
    order = torch.arange(M).expand(n, M)
    for j in reversed(range(c)):
        order = order.gather(1, keys[..., j].gather(1, order).argsort(dim=1, stable=True))
    ordered = keys.gather(1, order[..., None].expand(n, M, c))
    head = torch.ones(n, M, dtype=torch.bool)
    head[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).any(-1)
    run_head = torch.where(head, torch.arange(M), 0).cummax(1).values   # sorted position
    return torch.empty_like(order).scatter_(1, order, order.gather(1, run_head))


def _ignored(n: int, T: int) -> Tensor:
    return torch.full((n, T), IGNORE_INDEX, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------
def _mqar(cfg, n: int, g: torch.Generator, split: Split) -> tuple[Tensor, Tensor]:
    """Zoology's multiquery_ar. Positions 0 .. 2N-1: k1 v1 ... kN vN; the rest is `space`
    2-token query slots; key i sits at the start of slot gap_i - 1 (position
    2N + 2·(gap_i - 1)), gap_i the i-th draw without replacement from p(gap) ∝ a·gap^(a-1),
    gap = 1 .. space. Every other position is a uniform token of the whole vocabulary
    (Zoology's random_non_queries), the one after a query included."""
    N, T, V = cfg.num_pairs, cfg.seq_len, cfg.vocab_size
    half = V // 2
    keys = 1 + _without_replacement(torch.zeros(n, half - 1, dtype=torch.float64), N, g)
    values = half + _without_replacement(torch.zeros(n, V - half, dtype=torch.float64), N, g)
    space = (T - 2 * N) // 2
    log_p = (cfg.power - 1) * torch.arange(1, space + 1, dtype=torch.float64).log()
    slots = _without_replacement(log_p.expand(n, space), N, g)       # (n, N)
    inputs = torch.randint(V, (n, T), generator=g)
    inputs[:, 0:2 * N:2] = keys
    inputs[:, 1:2 * N:2] = values
    at = 2 * N + 2 * slots                                             # (n, N) query keys
    inputs.scatter_(1, at, keys)
    targets = _ignored(n, T).scatter_(1, at, values)
    return inputs, targets


def _in_context_recall(cfg, n: int, g: torch.Generator, split: Split) -> tuple[Tensor, Tensor]:
    """MAD's in-context recall, multi-query. P = T/2 - 1 pairs, then the query pair. Keys
    0 .. K-1 with replacement; each sequence maps every key to a value K .. kv-1 (values may
    repeat across keys); a pair is noise (two tokens kv .. V-1) with probability frac_noise.
    Scored: the key of every real pair whose key was shown earlier (target: its value), and
    the query key; the last position (the query's value) is not scored."""
    T, V = cfg.seq_len, cfg.vocab_size
    noise_vocab, frac = getattr(cfg, "noise_vocab_size", 0), getattr(cfg, "frac_noise", 0.0)
    kv = V - noise_vocab
    K, P = kv // 2, T // 2 - 1
    rows, pair = torch.arange(n), torch.arange(P)
    keys = torch.randint(K, (n, P), generator=g)
    table = K + torch.randint(kv - K, (n, K), generator=g)            # (n, K) key -> value
    values = table.gather(1, keys)
    noise = torch.zeros(n, P, dtype=torch.bool)
    first_tok, second_tok = keys, values
    if frac > 0:
        noise = torch.rand(n, P, generator=g) < frac
        noise[rows, torch.randint(P, (n,), generator=g)] = False      # one real pair at least
        tok = kv + torch.randint(noise_vocab, (n, P, 2), generator=g)
        first_tok = torch.where(noise, tok[..., 0], keys)
        second_tok = torch.where(noise, tok[..., 1], values)
    # pair index of each key's first real occurrence (P: never shown)
    first = torch.full((n, K), P).scatter_reduce(1, keys, torch.where(noise, P, pair), "amin")
    repeat = ~noise & (first.gather(1, keys) < pair)
    shown = first < P
    query = torch.where(shown, torch.rand(n, K, generator=g), -1.0).argmax(1)   # uniform
    answer = table[rows, query]

    inputs = torch.empty(n, T, dtype=torch.long)
    inputs[:, 0:2 * P:2], inputs[:, 1:2 * P:2] = first_tok, second_tok
    inputs[:, T - 2], inputs[:, T - 1] = query, answer
    targets = _ignored(n, T)
    targets[:, 0:2 * P:2] = torch.where(repeat, values, IGNORE_INDEX)
    targets[:, T - 2] = answer
    return inputs, targets


def _fuzzy_in_context_recall(cfg, n: int, g: torch.Generator,
                             split: Split) -> tuple[Tensor, Tensor]:
    """MAD's fuzzy in-context recall, multi-query. A (T+1)-token stream: pads, pairs of a key
    (1 .. a distinct tokens of 0 .. K-1; exactly a in the test split) and a value (1 .. b
    distinct tokens of K .. V-2), then the query pair, a repeat of one of them; inputs are the
    first T tokens, targets the last T. A repeated key keeps the value of its first occurrence.
    As in MAD, pairs are added while they start before T - (query pair) - (a + b), so at least
    two pads lead. Scored: every value token of a pair whose key was shown earlier."""
    T, V = cfg.seq_len, cfg.vocab_size
    a, b = cfg.k_motif_size, cfg.v_motif_size
    W, pad, K, M = a + b, V - 1, (V - 1) // 2, T // 2     # M slots: more pairs never fit
    rows, slot, col = torch.arange(n), torch.arange(M), torch.arange(W)
    if split == "test":
        ksize = torch.full((n, M), a)
    else:
        ksize = 1 + torch.randint(a, (n, M), generator=g)
    vsize = 1 + torch.randint(b, (n, M), generator=g)
    ktok = _distinct_small((n, M), K, a, g)
    vtok = K + _distinct_small((n, M), V - 1 - K, b, g)

    # a key is its size and its tokens (-1 past the size)
    shown_tok = torch.where(torch.arange(a) < ksize[..., None], ktok, -1)
    first = _first_equal(torch.cat([ksize[..., None], shown_tok], -1))
    repeat = first < slot
    vsize = vsize.gather(1, first)
    vtok = vtok.gather(1, first[..., None].expand(n, M, b))

    length = ksize + vsize
    start = length.cumsum(1) - length
    fits = start < T - length - W                         # slot 0 fits as T >= 2W + 1
    query = torch.where(fits, torch.rand(n, M, generator=g), -1.0).argmax(1)
    q_len = length[rows, query]
    kept = start < (T - q_len - W)[:, None]               # a prefix of the slots, query's in it
    body = torch.where(kept, start + length, 0).amax(1)
    lead = T + 1 - body - q_len                           # pads before the first pair

    # each slot's pair as W columns: key tokens, then value tokens, then unused
    ks = ksize[..., None]
    src = torch.where(col < ks, col, a + col - ks).clamp(max=W - 1)
    tok = torch.cat([ktok, vtok], -1).gather(-1, src)     # (n, M, W)
    used = col < length[..., None]
    is_value = used & (col >= ks)

    # write the kept pairs, then the query, into the (T+1)-token stream; unused columns go to
    # a sink column T+1
    at = torch.where(used & kept[..., None], lead[:, None, None] + start[..., None] + col, T + 1)
    q_tok, q_used, q_value = tok[rows, query], used[rows, query], is_value[rows, query]
    q_at = torch.where(q_used, (T + 1 - q_len)[:, None] + col, T + 1)
    where = torch.cat([at.view(n, M * W), q_at], 1)
    tokens = torch.cat([tok.view(n, M * W), q_tok], 1)
    scored = torch.cat([torch.where(is_value & repeat[..., None], tok, IGNORE_INDEX).view(n, M * W),
                        torch.where(q_value, q_tok, IGNORE_INDEX)], 1)
    stream = torch.full((n, T + 2), pad).scatter_(1, where, tokens)
    target = torch.full((n, T + 2), IGNORE_INDEX).scatter_(1, where, scored)
    return stream[:, :T].clone(), target[:, 1:T + 1].clone()


def _selective_copying(cfg, n: int, g: torch.Generator, split: Split) -> tuple[Tensor, Tensor]:
    """MAD's selective copying. C tokens of 0 .. V-3 with T - 2C - 1 blanks (V-2) among them,
    each blank before a uniformly chosen token (as MAD's ``np.insert`` at indices < C, so the
    last token is never followed by a blank), the copy token (V-1), then C blanks. Scored: the
    C trailing blanks (targets: the tokens in order)."""
    T, V, C = cfg.seq_len, cfg.vocab_size, cfg.num_tokens_to_copy
    blank, copy = V - 2, V - 1
    tokens = torch.randint(V - 2, (n, C), generator=g)
    precedes = torch.randint(C, (n, T - 2 * C - 1), generator=g)     # the token after a blank
    before = torch.zeros(n, C, dtype=torch.long).scatter_add_(1, precedes,
                                                               torch.ones_like(precedes))
    inputs = torch.full((n, T), blank).scatter_(1, torch.arange(C) + before.cumsum(1), tokens)
    inputs[:, T - C - 1] = copy
    targets = _ignored(n, T)
    targets[:, T - C:] = tokens
    return inputs, targets


def _compression(cfg, n: int, g: torch.Generator, split: Split) -> tuple[Tensor, Tensor]:
    """MAD's compression, causal: m = T/2 tokens of 0 .. V-2, then the compression token V-1
    m times; the j-th compression token's target is the j-th token. Scored: those m."""
    T, V = cfg.seq_len, cfg.vocab_size
    m = T // 2
    tokens = torch.randint(V - 1, (n, m), generator=g)
    inputs = torch.cat([tokens, torch.full((n, m), V - 1)], 1)
    targets = _ignored(n, T)
    targets[:, m:] = tokens
    return inputs, targets


@functools.lru_cache(maxsize=8)
def facts(vocab_size: int, seed: int) -> Tensor:
    """Memorization's fixed map: ``facts(V, seed)[k]`` is key k's value, keys 0 .. K-1 with
    K = (V-1)//2, values distinct, from K .. V-2 (MAD's ``generate_kv_map``). Read only."""
    K = (vocab_size - 1) // 2
    g = _generator(seed, "facts")
    return K + torch.randperm(vocab_size - 1 - K, generator=g)[:K]


def _memorization(cfg, n: int, g: torch.Generator, split: Split) -> tuple[Tensor, Tensor]:
    """MAD's memorization: T/2 pairs ``key insert`` (insert = V-1), keys uniform with
    replacement; the same facts (:func:`facts`) in every sequence, training and test alike.
    Scored: each insert token (target: the key's value)."""
    T, V = cfg.seq_len, cfg.vocab_size
    keys = torch.randint((V - 1) // 2, (n, T // 2), generator=g)
    inputs = torch.full((n, T), V - 1)
    inputs[:, 0::2] = keys
    targets = _ignored(n, T)
    targets[:, 1::2] = facts(V, cfg.seed)[keys]
    return inputs, targets


_GENERATORS = {
    "mqar": _mqar,
    "in_context_recall": _in_context_recall,
    "noisy_in_context_recall": _in_context_recall,
    "fuzzy_in_context_recall": _fuzzy_in_context_recall,
    "selective_copying": _selective_copying,
    "compression": _compression,
    "memorization": _memorization,
}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def generate(cfg: TaskData, n: int, generator: torch.Generator, *,
             split: Split = "train") -> tuple[Tensor, Tensor]:
    """n sequences of task ``cfg``: inputs (n, T) int64 and targets (n, T) int64, targets[i, t]
    the token to predict after ``inputs[i, :t+1]``, :data:`IGNORE_INDEX` where not scored.
    Deterministic given the generator state. ``split="test"`` draws the test distribution
    where a task has its own (fuzzy recall: keys of k_motif_size tokens only).

    Raises :class:`DataError` for settings that cannot make a sequence (``cfg.problems()``)."""
    problems = cfg.problems()
    if problems:
        what, where, why, fix = problems[0]
        raise DataError(what, where=f"data.{where}", why=why, fix=fix)
    return _GENERATORS[cfg.task](cfg, n, generator, split)


def test_set(cfg: TaskData) -> tuple[Tensor, Tensor]:
    """The fixed test set: ``cfg.test_size`` sequences of the test split, a function of the
    settings and ``cfg.seed`` alone; cached per settings (each call returns a copy)."""
    inputs, targets = _test_set(type(cfg), cfg.model_dump_json())
    return inputs.clone(), targets.clone()


@functools.lru_cache(maxsize=8)
def _test_set(kind: type[TaskData], settings: str) -> tuple[Tensor, Tensor]:
    cfg = kind.model_validate_json(settings)
    return generate(cfg, cfg.test_size, _generator(cfg.seed, "test"), split="test")


_FIX_SMALL = ("lower data.test_size, or raise data.seq_len or data.vocab_size so the task has "
              "more distinct sequences")


def _row_keys(inputs: Tensor) -> list[bytes]:
    return [row.tobytes() for row in inputs.contiguous().numpy()]


class TaskStream:
    """Training batches of a task; never a row whose inputs equal a test row's inputs.

    ``train_size`` null: each batch is fresh from the trainer's generator, and rows that equal
    a test row are redrawn. ``train_size`` N: a fixed set of N sequences (its own seed, not the
    test set's) without the rows that equal a test row (``removed`` counts them); batches pick
    rows with ``torch.randint`` on the trainer's generator, so a resumed run continues
    identically once that generator's state is restored."""

    def __init__(self, cfg: TaskData):
        self.cfg = cfg
        self.test = test_set(cfg)
        self._test_rows = set(_row_keys(self.test[0]))
        self.train: tuple[Tensor, Tensor] | None = None
        self.removed = 0
        if cfg.train_size is not None:
            inputs, targets = generate(cfg, cfg.train_size, _generator(cfg.seed, "train"))
            keep = ~self._in_test(inputs)
            self.removed = int((~keep).sum())
            if not keep.any():
                raise DataError(
                    f"all data.train_size={cfg.train_size} training sequences of "
                    f"{cfg.task} are also test sequences", where="data.train_size",
                    why="training rows equal to a test row are removed; these settings make "
                    "few distinct sequences", fix=_FIX_SMALL)
            self.train = (inputs[keep], targets[keep])

    def _in_test(self, inputs: Tensor) -> Tensor:
        return torch.tensor([k in self._test_rows for k in _row_keys(inputs)], dtype=torch.bool)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64, drawn with ``generator``."""
        if self.train is not None:
            pick = torch.randint(len(self.train[0]), (batch_size,), generator=generator)
            return self.train[0][pick], self.train[1][pick]
        inputs, targets = generate(self.cfg, batch_size, generator)
        for _ in range(MAX_REDRAWS):
            hit = self._in_test(inputs)
            if not hit.any():
                return inputs, targets
            inputs[hit], targets[hit] = generate(self.cfg, int(hit.sum()), generator)
        raise DataError(
            f"{self.cfg.task} training batches keep drawing test sequences", where="data",
            why=f"a training row equal to a test row is redrawn, and {MAX_REDRAWS} rounds of "
            "redrawing still hit the test set: it holds nearly every sequence these settings "
            "can make", fix=_FIX_SMALL)


def accuracy(logits: Tensor, targets: Tensor) -> tuple[int, int]:
    """(correct, scored) over the positions where ``targets != IGNORE_INDEX``, the prediction
    being the argmax of ``logits`` (..., T, V) over the vocabulary; targets (..., T)."""
    scored = targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == targets) & scored
    return int(correct.sum()), int(scored.sum())
