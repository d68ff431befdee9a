"""composer.run.tasks and composer.recipe.tasks: synthetic tasks against slow references.

Each task has a reference checker below that reads one sequence with plain Python loops,
knowing only the task's published definition (not the generator's code), and asserts every
structural rule and every scored target. ``tasks.test_set`` is reached through the module:
imported by name, pytest would collect it as a test.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

import composer.run.tasks as tasks
from composer.core.errors import DataError
from composer.recipe.tasks import TASKS, MQARData
from composer.run.tasks import IGNORE_INDEX, TaskStream, accuracy, facts, generate

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "data"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Reference checkers: one sequence, plain Python
# --------------------------------------------------------------------------------------------
def check_mqar(cfg, x: list[int], y: list[int]) -> list[int]:
    """Zoology's layout; returns each pair's query slot, pairs in context order."""
    N, T, V = cfg.num_pairs, cfg.seq_len, cfg.vocab_size
    half = V // 2
    value_of, order = {}, []
    for i in range(N):
        k, v = x[2 * i], x[2 * i + 1]
        assert 1 <= k < half and half <= v < V, (k, v)
        assert k not in value_of, "keys are distinct within a sequence"
        value_of[k] = v
        order.append(k)
    assert len(set(value_of.values())) == N, "values are distinct within a sequence"
    assert all(0 <= t < V for t in x)
    slot_of = {}
    for t in range(T):
        if y[t] == IGNORE_INDEX:
            continue
        assert t >= 2 * N and (t - 2 * N) % 2 == 0, f"scored position {t} is not a query slot"
        k = x[t]
        assert k in value_of and y[t] == value_of[k]
        assert k not in slot_of, "each key is queried once"
        slot_of[k] = (t - 2 * N) // 2
    assert len(slot_of) == N, "one scored position per pair"
    return [slot_of[k] for k in order]


def check_recall(cfg, x: list[int], y: list[int]) -> int:
    """MAD's multi-query in-context recall (plain or noisy); returns the noise pairs."""
    T, V = cfg.seq_len, cfg.vocab_size
    kv = V - getattr(cfg, "noise_vocab_size", 0)
    K = kv // 2
    value_of, noise = {}, 0
    for j in range(T // 2 - 1):
        k, v = x[2 * j], x[2 * j + 1]
        assert y[2 * j + 1] == IGNORE_INDEX
        if k >= kv:
            assert kv <= v < V and y[2 * j] == IGNORE_INDEX
            noise += 1
            continue
        assert k < K and K <= v < kv, (k, v)
        assert y[2 * j] == (v if k in value_of else IGNORE_INDEX)
        assert value_of.setdefault(k, v) == v, "a key keeps its value"
    assert noise < T // 2 - 1, "at least one real pair"
    q, answer = x[T - 2], x[T - 1]
    assert q in value_of and value_of[q] == answer
    assert y[T - 2] == answer and y[T - 1] == IGNORE_INDEX
    return noise


def check_fuzzy(cfg, x: list[int], y: list[int], split: str) -> None:
    """MAD's fuzzy recall: pads, then key runs (ids < K) and value runs (K .. V-2) alternate."""
    T, V, a, b = cfg.seq_len, cfg.vocab_size, cfg.k_motif_size, cfg.v_motif_size
    pad, K = V - 1, (V - 1) // 2
    stream = x + [y[-1]]                      # the last target is the query's last value token
    lead = 0
    while stream[lead] == pad:
        lead += 1
    assert lead >= 2
    pairs, i = [], lead
    while i < len(stream):
        k0 = i
        while i < len(stream) and stream[i] < K:
            i += 1
        v0 = i
        while i < len(stream) and K <= stream[i] < pad:
            i += 1
        key, value = tuple(stream[k0:v0]), tuple(stream[v0:i])
        assert 1 <= len(key) <= a and 1 <= len(value) <= b, (key, value)
        assert len(set(key)) == len(key) and len(set(value)) == len(value)
        if split == "test":
            assert len(key) == a
        pairs.append((key, value, v0))
    value_of = {}
    expected = [IGNORE_INDEX] * T
    for key, value, v0 in pairs:
        if key in value_of:
            assert value_of[key] == value, "a key keeps its value"
            for j, tok in enumerate(value):
                expected[v0 + j - 1] = tok
        value_of.setdefault(key, value)
    assert pairs[-1][0] in {p[0] for p in pairs[:-1]}, "the query's key appeared before"
    assert y == expected


def check_selective_copying(cfg, x: list[int], y: list[int]) -> int:
    """MAD's selective copying; returns the blanks before the first token."""
    T, V, C = cfg.seq_len, cfg.vocab_size, cfg.num_tokens_to_copy
    blank, copy = V - 2, V - 1
    head = x[:T - C - 1]
    tokens = [t for t in head if t != blank]
    assert len(tokens) == C and all(0 <= t < blank for t in tokens)
    assert head[-1] != blank, "no blank after the last token (MAD inserts before tokens)"
    assert x[T - C - 1] == copy and x[T - C:] == [blank] * C
    assert y == [IGNORE_INDEX] * (T - C) + tokens
    return head.index(tokens[0])


def check_compression(cfg, x: list[int], y: list[int]) -> None:
    T, V = cfg.seq_len, cfg.vocab_size
    m = T // 2
    assert all(0 <= t < V - 1 for t in x[:m]) and x[m:] == [V - 1] * m
    assert y == [IGNORE_INDEX] * m + x[:m]


def check_memorization(cfg, x: list[int], y: list[int], value_of: dict) -> None:
    """MAD's memorization; ``value_of`` collects the facts across sequences."""
    V = cfg.vocab_size
    K = (V - 1) // 2
    for j in range(cfg.seq_len // 2):
        k, v = x[2 * j], y[2 * j + 1]
        assert 0 <= k < K and x[2 * j + 1] == V - 1 and y[2 * j] == IGNORE_INDEX
        assert K <= v < V - 1
        assert value_of.setdefault(k, v) == v, "facts are fixed"


def check(cfg, x: torch.Tensor, y: torch.Tensor, split: str = "train") -> None:
    """Every row of (x, y) against its task's reference."""
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
    assert x.shape[1] == cfg.seq_len
    value_of: dict = {}
    for xi, yi in zip(x.tolist(), y.tolist()):
        if cfg.task == "mqar":
            check_mqar(cfg, xi, yi)
        elif cfg.task in ("in_context_recall", "noisy_in_context_recall"):
            check_recall(cfg, xi, yi)
        elif cfg.task == "fuzzy_in_context_recall":
            check_fuzzy(cfg, xi, yi, split)
        elif cfg.task == "selective_copying":
            check_selective_copying(cfg, xi, yi)
        elif cfg.task == "compression":
            check_compression(cfg, xi, yi)
        else:
            check_memorization(cfg, xi, yi, value_of)


# Settings per task: the defaults, small ones, and the shortest sequence each allows.
CASES = [
    ("mqar", {}), ("mqar", {"vocab_size": 4, "seq_len": 4, "num_pairs": 1}),
    ("mqar", {"seq_len": 32, "num_pairs": 8, "power": 1.0}),
    ("mqar", {"vocab_size": 20, "num_pairs": 9, "seq_len": 36}),
    ("in_context_recall", {}), ("in_context_recall", {"seq_len": 4, "vocab_size": 2}),
    ("noisy_in_context_recall", {}),
    ("noisy_in_context_recall", {"seq_len": 4, "frac_noise": 0.9}),
    ("fuzzy_in_context_recall", {}),
    ("fuzzy_in_context_recall", {"seq_len": 13}),
    ("fuzzy_in_context_recall", {"seq_len": 7, "vocab_size": 4, "k_motif_size": 1,
                                 "v_motif_size": 2}),
    ("selective_copying", {}), ("selective_copying", {"seq_len": 34}),
    ("selective_copying", {"seq_len": 4, "num_tokens_to_copy": 1, "vocab_size": 3}),
    ("compression", {}), ("compression", {"seq_len": 2, "vocab_size": 2}),
    ("memorization", {}), ("memorization", {"seq_len": 2, "vocab_size": 3}),
]
CASE_IDS = [f"{t}-{'-'.join(f'{k}{v}' for k, v in s.items()) or 'defaults'}" for t, s in CASES]


# --------------------------------------------------------------------------------------------
# Generated sequences follow each task's definition
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,settings", CASES, ids=CASE_IDS)
def test_sequences_match_the_reference(task, settings):
    cfg = TASKS[task](**settings)
    assert cfg.problems() == []
    for n, split in ((48, "train"), (1, "train"), (16, "test")):
        x, y = generate(cfg, n, _gen(11 + n), split=split)
        assert x.shape == (n, cfg.seq_len)
        check(cfg, x, y, split)


@pytest.mark.parametrize("power", [0.01, 0.5])
def test_mqar_query_gaps_follow_the_power_law(power):
    # gap g = 1 .. space has p(g) ∝ a·g^(a-1) (Zoology); the first pair's slot is the first
    # draw, the second pair's the second draw without replacement: sum over the first draw i
    # of p_i · p_j / (1 - p_i)
    cfg = MQARData(vocab_size=64, seq_len=64, num_pairs=4, power=power)
    n, space = 20_000, (64 - 8) // 2
    x, y = generate(cfg, n, _gen(3))
    scored = y != IGNORE_INDEX
    slots = []
    for pair in range(2):
        hit = (x == x[:, 2 * pair:2 * pair + 1]) & scored
        assert (hit.sum(1) == 1).all()
        slots.append((hit.float().argmax(1) - 8) // 2)
    weights = [power * g ** (power - 1) for g in range(1, space + 1)]
    p = [w / sum(weights) for w in weights]
    second = [sum(p[i] * p[j] / (1 - p[i]) for i in range(space) if i != j) for j in range(space)]
    for expected, got in ((p, slots[0]), (second, slots[1])):
        freq = torch.bincount(got, minlength=space).double() / n
        for j in range(space):
            tol = 5 * math.sqrt(expected[j] * (1 - expected[j]) / n)
            assert abs(freq[j] - expected[j]) <= tol, (j, float(freq[j]), expected[j])
    if power < 1:   # short gaps are the likely ones
        assert p == sorted(p, reverse=True)
        freq0 = torch.bincount(slots[0], minlength=space)
        assert freq0[0] > 3 * freq0[-1]


def test_mqar_fills_the_other_positions_with_uniform_tokens():
    # Zoology's random_non_queries: every position that is no pair and no query is uniform
    # over the whole vocabulary
    cfg = MQARData(vocab_size=16, seq_len=64, num_pairs=4)
    x, y = generate(cfg, 4000, _gen(5))
    queried = torch.zeros_like(x, dtype=torch.bool)
    queried[:, :8] = True
    queried |= y != IGNORE_INDEX
    fill = x[~queried]
    counts = torch.bincount(fill, minlength=16).double()
    expected = fill.numel() / 16
    assert (counts - expected).abs().max() <= 5 * math.sqrt(expected)


def test_noise_pairs_appear_at_the_set_rate():
    cfg = TASKS["noisy_in_context_recall"](frac_noise=0.3)
    x, y = generate(cfg, 400, _gen(2))
    pairs = cfg.seq_len // 2 - 1
    noise = sum(check_recall(cfg, xi, yi) for xi, yi in zip(x.tolist(), y.tolist()))
    # one pair per sequence is kept real; the others are noise with probability 0.3
    trials = 400 * (pairs - 1)
    assert abs(noise - 0.3 * trials) <= 5 * math.sqrt(trials * 0.3 * 0.7)


def test_selective_copying_spreads_blanks_evenly():
    # each blank goes before a uniformly chosen token: Binomial(blanks, 1/C) before the first
    cfg = TASKS["selective_copying"](seq_len=64, num_tokens_to_copy=8)
    x, y = generate(cfg, 2000, _gen(4))
    before = [check_selective_copying(cfg, xi, yi) for xi, yi in zip(x.tolist(), y.tolist())]
    blanks, C = 64 - 2 * 8 - 1, 8
    mean, sd = blanks / C, math.sqrt(blanks * (1 / C) * (1 - 1 / C) / 2000)
    assert abs(sum(before) / 2000 - mean) <= 5 * sd


def test_fuzzy_keys_vary_in_size_in_training_only():
    cfg = TASKS["fuzzy_in_context_recall"]()
    K = (cfg.vocab_size - 1) // 2
    sizes = {}
    for split in ("train", "test"):
        x, _ = generate(cfg, 32, _gen(8), split=split)
        runs = set()
        for row in x.tolist():
            run = 0
            for t in row:
                if t < K:
                    run += 1
                elif run:
                    runs.add(run)
                    run = 0
        sizes[split] = runs
    assert sizes == {"train": {1, 2, 3}, "test": {3}}


def test_memorization_facts_are_fixed_by_the_seed():
    cfg = TASKS["memorization"]()
    value_of: dict = {}
    stream = TaskStream(cfg)
    for x, y in (stream.test, stream.train, generate(cfg, 200, _gen(9))):
        for xi, yi in zip(x.tolist(), y.tolist()):
            check_memorization(cfg, xi, yi, value_of)
    assert len(value_of) == (cfg.vocab_size - 1) // 2, "every fact is seen"
    assert len(set(value_of.values())) == len(value_of), "one value per key"
    assert [value_of[k] for k in sorted(value_of)] == facts(cfg.vocab_size, cfg.seed).tolist()
    other = facts(cfg.vocab_size, cfg.seed + 1)
    assert not torch.equal(other, facts(cfg.vocab_size, cfg.seed))


# --------------------------------------------------------------------------------------------
# Determinism, the test set and the training stream
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(TASKS))
def test_generation_is_deterministic(task):
    cfg = TASKS[task]()
    a, b, c = (generate(cfg, 8, _gen(s)) for s in (1, 1, 2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    t1, t2 = tasks.test_set(cfg), tasks.test_set(cfg.model_copy())
    assert torch.equal(t1[0], t2[0]) and torch.equal(t1[1], t2[1])
    assert t1[0].shape == (cfg.test_size, cfg.seq_len)
    t1[0].fill_(0)                                     # callers get copies, not the cache
    assert not torch.equal(tasks.test_set(cfg)[0], t1[0])
    reseeded = tasks.test_set(TASKS[task](seed=1))
    assert not torch.equal(reseeded[0], t2[0])


# Settings with few distinct sequences, so a test row is often drawn again:
# mqar: [k v k r] with k = 1, v in {2, 3}, r in 0..3 (8 sequences); compression: 2^6.
TINY = [("mqar", {"vocab_size": 4, "seq_len": 4, "num_pairs": 1, "test_size": 4}),
        ("compression", {"vocab_size": 3, "seq_len": 12, "test_size": 30})]


def _rows(x: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in x.tolist()}


@pytest.mark.parametrize("task,settings", TINY, ids=[t for t, _ in TINY])
def test_stream_never_returns_a_test_row(task, settings):
    cfg = TASKS[task](**settings)
    test_rows = _rows(tasks.test_set(cfg)[0])
    stream = TaskStream(cfg)
    g = _gen(0)
    drawn = set()
    for _ in range(20):
        x, y = stream.batch(16, g)
        assert x.shape == (16, cfg.seq_len)
        check(cfg, x, y)
        drawn |= _rows(x)
    assert not drawn & test_rows
    # the unfiltered generator does return test rows at these settings
    assert _rows(generate(cfg, 320, _gen(0))[0]) & test_rows

    fixed = TaskStream(cfg.model_copy(update={"train_size": 200}))
    assert fixed.removed > 0
    assert len(fixed.train[0]) == 200 - fixed.removed
    assert not _rows(fixed.train[0]) & test_rows
    x, y = fixed.batch(64, g)
    check(cfg, x, y)
    assert not _rows(x) & test_rows


def test_fixed_stream_picks_rows_with_the_trainers_generator():
    cfg = TASKS["compression"](train_size=50)
    stream = TaskStream(cfg)
    g = _gen(7)
    state = g.get_state()
    x, y = stream.batch(8, g)
    pick = torch.randint(len(stream.train[0]), (8,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(x, stream.train[0][pick]) and torch.equal(y, stream.train[1][pick])
    g.set_state(state)                                # resume: same state, same batch
    assert torch.equal(stream.batch(8, g)[0], x)
    assert not torch.equal(stream.batch(8, g)[0], x)


def test_fixed_train_set_differs_from_the_test_set():
    cfg = TASKS["in_context_recall"](train_size=100, test_size=100)
    stream = TaskStream(cfg)
    assert stream.removed == 0 and not torch.equal(stream.train[0], stream.test[0])


def test_stream_refuses_when_the_test_set_holds_every_sequence():
    # compression at vocab 3, seq_len 4: 4 distinct sequences, all in a test set of 200
    cfg = TASKS["compression"](vocab_size=3, seq_len=4, test_size=200, train_size=None)
    assert len(_rows(tasks.test_set(cfg)[0])) == 4
    with pytest.raises(DataError, match="keep drawing test sequences"):
        TaskStream(cfg).batch(4, _gen(0))
    with pytest.raises(DataError, match="also test sequences") as err:
        TaskStream(cfg.model_copy(update={"train_size": 10}))
    assert "data.test_size" in err.value.fix


# --------------------------------------------------------------------------------------------
# Settings: problems, vocabulary, lengths, recipe files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(TASKS))
def test_defaults_have_no_problems(task):
    assert TASKS[task]().problems() == []
    assert tasks._GENERATORS.keys() == TASKS.keys()


IMPOSSIBLE = [
    ("mqar", {"num_pairs": 40}, "num_pairs"),
    ("mqar", {"seq_len": 127}, "seq_len"),
    ("mqar", {"vocab_size": 16, "num_pairs": 8}, "num_pairs"),
    ("in_context_recall", {"seq_len": 127}, "seq_len"),
    ("in_context_recall", {"seq_len": 2}, "seq_len"),
    ("noisy_in_context_recall", {"vocab_size": 17}, "noise_vocab_size"),
    ("fuzzy_in_context_recall", {"seq_len": 12}, "seq_len"),
    ("fuzzy_in_context_recall", {"vocab_size": 6}, "k_motif_size"),
    ("fuzzy_in_context_recall", {"vocab_size": 7, "k_motif_size": 1, "v_motif_size": 4},
     "v_motif_size"),
    ("selective_copying", {"num_tokens_to_copy": 64}, "seq_len"),
    ("selective_copying", {"seq_len": 33}, "seq_len"),
    ("compression", {"seq_len": 33}, "seq_len"),
    ("memorization", {"seq_len": 31}, "seq_len"),
]


@pytest.mark.parametrize("task,settings,where", IMPOSSIBLE,
                         ids=[f"{t}-{w}-{i}" for i, (t, _, w) in enumerate(IMPOSSIBLE)])
def test_problems_catch_each_impossible_setting(task, settings, where):
    cfg = TASKS[task](**settings)
    found = cfg.problems()
    assert where in [w for _, w, _, _ in found]
    for what, _, why, fix in found:
        assert what and why and "data." in fix
    with pytest.raises(DataError):
        generate(cfg, 1, _gen(0))


def test_problem_messages_give_numbers():
    (what, where, why, fix), = MQARData(num_pairs=40).problems()
    assert what == "data.num_pairs=40 needs data.seq_len >= 160; data.seq_len=128"
    assert where == "num_pairs" and "4 tokens" in why
    assert fix == "lower data.num_pairs to at most 32 or raise data.seq_len to 160"
    # the suggested fixes work
    assert MQARData(num_pairs=32).problems() == []
    assert MQARData(num_pairs=40, seq_len=160).problems() == []
    (_, _, _, fix), = TASKS["fuzzy_in_context_recall"](
        vocab_size=7, k_motif_size=1, v_motif_size=4).problems()
    assert fix == "lower data.v_motif_size to at most 3 or raise data.vocab_size to 8"
    assert TASKS["fuzzy_in_context_recall"](vocab_size=8, k_motif_size=1,
                                            v_motif_size=4).problems() == []


@pytest.mark.parametrize("task,shortest", [
    ("mqar", 32), ("in_context_recall", 4), ("noisy_in_context_recall", 4),
    ("fuzzy_in_context_recall", 13), ("selective_copying", 34), ("compression", 2),
    ("memorization", 2)])
def test_shortest_sequence(task, shortest):
    cfg = TASKS[task]().with_seq_len(shortest)
    assert cfg.problems() == []
    check(cfg, *generate(cfg, 1, _gen(1)))
    for shorter in (shortest - 1, shortest - 2):
        try:
            assert TASKS[task]().with_seq_len(shorter).problems() != []
        except ValidationError:
            pass


@pytest.mark.parametrize("task,settings", CASES, ids=CASE_IDS)
def test_vocab_needed_bounds_every_emitted_id(task, settings):
    cfg = TASKS[task](**settings)
    x, y = generate(cfg, 64, _gen(6))
    scored = y[y != IGNORE_INDEX]
    assert x.min() >= 0 and scored.min() >= 0
    assert x.max() < cfg.vocab_needed() and scored.max() < cfg.vocab_needed()


@pytest.mark.parametrize("task", list(TASKS))
def test_with_seq_len_changes_only_the_length(task):
    cfg = TASKS[task](seed=3)
    longer = cfg.with_seq_len(2 * cfg.seq_len)
    assert type(longer) is type(cfg) and longer.seq_len == 2 * cfg.seq_len
    assert longer.model_dump() == {**cfg.model_dump(), "seq_len": 2 * cfg.seq_len}
    assert cfg.seq_len != longer.seq_len                       # the original is unchanged
    check(longer, *generate(longer, 4, _gen(2)))


def test_mqar_runs_longer_than_its_vocabulary():
    # Zoology asserts vocab_size > seq_len; the construction does not need it
    cfg = MQARData().with_seq_len(512)
    assert cfg.problems() == []
    check(cfg, *generate(cfg, 4, _gen(0)))


@pytest.mark.parametrize("task", list(TASKS))
def test_recipe_file_holds_exactly_the_defaults(task):
    written = yaml.safe_load((RECIPES / f"{task}.yaml").read_text())
    assert written == TASKS[task]().model_dump()


def test_mqar_generation_is_fast():
    cfg = MQARData(seq_len=512)
    generate(cfg, 10, _gen(0))
    start = time.perf_counter()
    generate(cfg, 1000, _gen(1))
    assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------
def test_accuracy_counts_scored_positions_only():
    # batch 2, T 3, vocab 4; predictions (argmax): [[1, 2, 3], [0, 0, 2]]
    logits = torch.full((2, 3, 4), -1.0)
    for (i, t), tok in {(0, 0): 1, (0, 1): 2, (0, 2): 3, (1, 0): 0, (1, 1): 0,
                        (1, 2): 2}.items():
        logits[i, t, tok] = 2.0 + i + t
    targets = torch.tensor([[1, IGNORE_INDEX, 0], [IGNORE_INDEX, 0, 2]])
    # scored: (0,0) right, (0,2) wrong, (1,1) right, (1,2) right; (0,1) ignored though right
    assert accuracy(logits, targets) == (3, 4)
    assert accuracy(logits, torch.full((2, 3), IGNORE_INDEX)) == (0, 0)
