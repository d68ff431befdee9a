"""Comparing runs: one table across run folders and sweeps, for ``hycomp compare``.

A run is a folder holding ``summary.json`` (:mod:`composer.run.train`); a sweep is a folder with
run folders below it (``hycomp train -m`` writes ``runs/multirun/<date>/<time>/<job>/``).
:func:`collect` finds and reads the runs, :func:`compare` makes one row per run;
:mod:`composer.run.compare_table` writes the tables and :mod:`composer.run.compare_plots` draws
them. Per run:

* what differs: the keys whose values differ among the runs (:func:`differences`), shown as
  one column each and as the run's label, ``ratio=3:1, lr=0.001``;
* costs at a context of T tokens (default: each run's ``data.seq_len``), from the newest
  checkpoint's ``recipe.json`` through the layer graph (:func:`composer.build.costs.totals`):
  parameters, forward FLOPs per token, state bytes per sequence (recurrent states plus KV
  caches, fp32), and the attention share (:func:`attention_share`);
* results: final and best validation loss (nats per scored token), bits per byte (text) or
  final and best accuracy (tasks), ``eval.json``'s accuracy per (task, seq_len), tokens/s,
  wall time, status. A value the summary lacks is taken from ``metrics.jsonl``.

Best over a key (``best_over``, default ``train.lr``): runs equal in every differing key but
that one form a group, and the main table keeps the group's best run, as Zoology picks the
best learning rate per configuration: the highest final accuracy for task runs, else the
lowest final validation loss; ties go to the lower loss, and a run without the value never
wins while another has it.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from composer.core.errors import CheckpointError, HycompError
from composer.run.checkpoint import CKPT_DIR, latest_checkpoint, read_recipe
from composer.run.guards import finite
from composer.run.records import read_metrics
from composer.run.resume import flatten, lookup

SOFTMAX_ATTENTION = frozenset({"attention", "block_attention", "sparse_attention"})
"""Block kinds that mix by softmax attention over (some of) the past tokens: ``attention``
(global or sliding window), ``block_attention`` (chunks), ``sparse_attention`` (global tokens
plus a window). The linear-attention and recurrent families are not among them."""
SHORT_MIXERS = frozenset({"base_conv"})
"""Mixers left out of the attention share: they see only a few neighbouring tokens."""

BOOKKEEPING = frozenset({
    "train.resume", "train.progress", "train.threads", "train.logger", "train.log_every",
    "train.ckpt_every", "train.keep_checkpoints", "train.sample_tokens",
    "train.ignore_memory_check", "train.max_bad_steps"})
"""Keys that change how a run is kept, not what it trains: never a difference between runs."""

SEARCH_DEPTH = 4
"""How many folder levels below a given folder :func:`collect` looks for runs."""
MAX_LABEL_KEYS = 4
"""A label names at most this many differing keys (the table has a column for each)."""
_ABSENT = "\0absent"
_FIX = ("give run folders of `hycomp train` (runs/<date>/<time>), sweep folders "
        "(runs/multirun/<date>/<time>) or a quoted glob ('runs/2026-12-05/*')")


@dataclass
class RunRecord:
    """One run folder as :func:`collect` read it."""
    path: Path
    summary: dict
    recipe: dict                        # recipe.json of the newest checkpoint
    checkpoint: Path
    overrides: list[str] | None         # None: none recorded (summary.json, .hydra/)
    metrics: list[dict] = field(default_factory=list)
    eval: dict | None = None            # eval.json, when `hycomp eval` wrote one
    name: str = ""                      # the folder's path below the runs' common folder

    @property
    def task(self) -> str:
        """``text``, or the synthetic task's name (``task`` when only accuracies tell)."""
        named = self.summary.get("task") or (self.recipe.get("data") or {}).get("task")
        if named:
            return str(named)
        accs = [self.summary.get("val_acc")] + [r.get("val_acc") for r in self.metrics]
        return "task" if any(a is not None for a in accs) else "text"


# --------------------------------------------------------------------------------------------
# Finding and reading runs
# --------------------------------------------------------------------------------------------
def collect(paths: list[str], notes: list[str] | None = None) -> list[RunRecord]:
    """The runs that ``paths`` name, each once, in order: a run folder, a sweep (the run
    folders up to :data:`SEARCH_DEPTH` levels below it, in job order: names compared number
    by number), or a glob pattern (``*``, ``?``, ``[``). A path that does not exist, is a
    file, or holds no run raises :class:`HycompError`. A run that cannot be read (a damaged
    summary.json, no checkpoint) is skipped with a line in ``notes``; none left is an error."""
    notes = [] if notes is None else notes
    found: dict[Path, Path] = {}
    for p in map(str, paths):
        for d in _runs_at(p, notes):
            found.setdefault(d.resolve(), d)
    records = [r for d in found.values() if (r := _read_run(d, notes)) is not None]
    if not records:
        raise HycompError(what="no run to compare", where=" ".join(map(str, paths)),
                          why="every run folder found was skipped: " + "; ".join(notes),
                          fix="give runs that wrote a checkpoint and summary.json")
    root = os.path.commonpath([str(r.path.resolve()) for r in records])
    for r in records:
        rel = os.path.relpath(r.path.resolve(), root)
        r.name = r.path.resolve().name if rel == "." else rel
    return records


def _natural_text(text: str) -> tuple:
    """Sort key of a name compared number by number (job 2 before job 10)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text))


def _natural(path) -> tuple:
    return tuple(_natural_text(part) for part in Path(path).parts)


def _runs_at(p: str, notes: list[str]) -> list[Path]:
    if any(c in p for c in "*?["):
        matches = sorted(glob.glob(p, recursive=True), key=_natural)
        dirs = [Path(m).parent if Path(m).name == "summary.json" else Path(m) for m in matches]
        runs = [r for d in dirs if d.is_dir() for r in _runs_below(d, SEARCH_DEPTH, notes)]
        if not runs:
            raise HycompError(what=f"no run matches {p!r}", where=p,
                              why=(f"the pattern matches {len(matches)} paths, none a run "
                                   "folder or above one" if matches else
                                   "the pattern matches no file or folder"), fix=_FIX)
        return runs
    path = Path(p)
    if not path.exists():
        raise HycompError(what=f"run or sweep folder not found: {p}", where=p,
                          why="there is no file or folder there", fix=_FIX)
    if not path.is_dir():
        raise HycompError(what=f"{p} is a file, not a run or sweep folder", where=p,
                          why="a run is a folder holding summary.json, checkpoints/ and "
                              "metrics.jsonl",
                          fix=f"give the folder the file is in ({path.parent}), or " + _FIX)
    runs = _runs_below(path, SEARCH_DEPTH, notes)
    if not runs:
        raise HycompError(what=f"no run in {p}", where=p,
                          why=f"no folder up to {SEARCH_DEPTH} levels below it holds "
                              "summary.json (written when a run of `hycomp train` ends)",
                          fix=_FIX)
    return runs


def _runs_below(d: Path, depth: int, notes: list[str]) -> list[Path]:
    """``d`` when it is a run folder, else the run folders below it (``depth`` levels)."""
    if (d / "summary.json").is_file():
        return [d]
    if (d / "metrics.jsonl").is_file():
        notes.append(f"warning: skipped {d}: no summary.json (still training, or killed "
                     "before it could write one)")
        return []
    if depth == 0:
        return []
    try:
        subs = sorted((s for s in d.iterdir() if s.is_dir() and not s.name.startswith(".")
                       and s.name != CKPT_DIR), key=_natural)
    except OSError:
        return []
    return [r for s in subs for r in _runs_below(s, depth - 1, notes)]


def _read_run(d: Path, notes: list[str]) -> RunRecord | None:
    try:
        summary = json.loads((d / "summary.json").read_text())
        if not isinstance(summary, dict):
            raise ValueError(f"it holds a JSON {type(summary).__name__}, not an object")
    except (OSError, ValueError) as e:
        notes.append(f"warning: skipped {d}: summary.json is not readable JSON ({e})")
        return None
    try:
        ckpt = latest_checkpoint(d)
        recipe = read_recipe(ckpt)
    except CheckpointError as e:
        notes.append(f"warning: skipped {d}: {e.what} ({e.why})")
        return None
    if not isinstance(recipe, dict):
        notes.append(f"warning: skipped {d}: {ckpt}/recipe.json holds no recipe")
        return None
    try:
        metrics = read_metrics(d / "metrics.jsonl")
    except ValueError as e:
        notes.append(f"warning: {d}/metrics.jsonl is damaged ({e}): no curves for this run")
        metrics = []
    return RunRecord(path=d, summary=summary, recipe=recipe, checkpoint=ckpt,
                     overrides=_recorded_overrides(d, summary),
                     metrics=[r for r in metrics if isinstance(r, dict)],
                     eval=_read_eval(d, notes))


def _recorded_overrides(d: Path, summary: dict) -> list[str] | None:
    """summary.json's ``overrides``, else Hydra's ``.hydra/overrides.yaml``, else None."""
    if isinstance(summary.get("overrides"), list):
        return [str(o) for o in summary["overrides"]]
    try:
        listed = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return [str(o) for o in listed] if isinstance(listed, list) else None


def _read_eval(d: Path, notes: list[str]) -> dict | None:
    path = d / "eval.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("results", []), list):
            raise ValueError("no list of results")
        return data
    except (OSError, ValueError) as e:
        notes.append(f"warning: {path} is not readable ({e}): its accuracies are left out")
        return None


# --------------------------------------------------------------------------------------------
# What differs
# --------------------------------------------------------------------------------------------
def _parse_override(o: str) -> tuple[str, str] | None:
    """``(key, value)`` of a Hydra override (``+`` / ``~`` and ``@package`` dropped); None for
    a deletion and for Hydra's own or bookkeeping keys."""
    key, eq, value = o.strip().partition("=")
    key = key.lstrip("+~").split("@", 1)[0]
    if not eq or not key or key.startswith("hydra.") or key in BOOKKEEPING:
        return None
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    else:  # unquoted: Hydra's backslash escapes (ratio=3\:1) read as the plain value
        value = re.sub(r"\\(.)", r"\1", value)
    return key, value


def _canon(v: Any) -> Any:
    """A value as compared: an override's text and the recipe's value agree (``1e-3`` and
    0.001, ``null`` and None, ``true`` and True)."""
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("null", "none", "~"):
            return None
        if low in ("true", "false"):
            return low == "true"
        try:
            return float(v)
        except ValueError:
            return v
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return json.dumps(v, sort_keys=True)


def _show(v: Any) -> str:
    if v is _ABSENT or v == _ABSENT:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, (dict, list)) or v is None or isinstance(v, bool):
        return json.dumps(v, separators=(",", ":"))
    return f"{v:g}" if isinstance(v, float) else str(v)


def differences(records: list[RunRecord]) -> tuple[list[str], list[dict], list[dict]]:
    """``(keys, shown, compared)``: the keys whose values differ among ``records`` (first-seen
    order), and per record each key's value as shown and as compared.

    The keys of the runs' overrides come first, a run without the key taking its recipe's
    value (``lr=1e-3`` equals a recipe's 0.001). When some run has no overrides recorded
    (made one by one from Python, say), or its overrides tell no two runs apart, the keys of
    the flattened recipes (``model.schedule.ratio``) whose values differ follow, except those
    under a key already listed and :data:`BOOKKEEPING`."""
    parsed = [dict(kv for o in (r.overrides or []) if (kv := _parse_override(o)))
              for r in records]
    shown: list[dict] = [{} for _ in records]
    compared: list[dict] = [{} for _ in records]
    keys: list[str] = []
    for k in dict.fromkeys(k for p in parsed for k in p):
        for i, r in enumerate(records):
            v = parsed[i][k] if k in parsed[i] else lookup(r.recipe, k, _ABSENT)
            shown[i][k], compared[i][k] = _show(v), _canon(v)
        if len({_key(c[k]) for c in compared}) > 1:
            keys.append(k)
    if any(r.overrides is None for r in records) or not keys:
        flat = [flatten(r.recipe) for r in records]
        for k in dict.fromkeys(k for f in flat for k in f):
            if k in BOOKKEEPING or any(k == c or k.startswith(c + ".") for c in keys):
                continue
            values = [f.get(k, _ABSENT) for f in flat]
            if len({_key(_canon(v)) for v in values}) > 1:
                keys.append(k)
                for i, v in enumerate(values):
                    shown[i][k], compared[i][k] = _show(v), _canon(v)
    return keys, shown, compared


def _key(v: Any) -> tuple:
    return (type(v).__name__, v)


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key cut to its last component, or last two, or all of it: the shortest cut that
    no other key cut as far shares (``model.schedule.ratio`` -> ``ratio``)."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in (1, 2, len(parts)):
            cut = ".".join(parts[-n:])
            if n >= len(parts) or sum(".".join(o.split(".")[-n:]) == cut for o in keys) == 1:
                out[k] = cut
                break
    return out


def _labels(records, shown, keys, short, fallback) -> list[str]:
    """``key=value, ...`` over ``keys`` (at most :data:`MAX_LABEL_KEYS`); equal labels get the
    folder name appended."""
    labels = [", ".join(f"{short[k]}={s[k]}" for k in keys[:MAX_LABEL_KEYS]) or fallback(r)
              for r, s in zip(records, shown)]
    counts = Counter(labels)
    return [f"{lab} ({r.name})" if counts[lab] > 1 else lab for lab, r in zip(labels, records)]


# --------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------
def attention_share(g) -> float | None:
    """Share of the sequence mixing done by softmax attention, over the layer graph ``g``:
    ``A / N``. N counts the sequence-mixing sub-layers: every schedule entry but the FFNs
    (role ``ffn``: mlp, moe) and the short convolutions (:data:`SHORT_MIXERS`: they mix k
    neighbouring tokens, Zoology's companion of every mixer), a routed sub-layer only when one
    of its paths is a mixer. A
    sub-layer adds to A the fraction of its mixers that are softmax attention
    (:data:`SOFTMAX_ATTENTION`): 1 or 0 for a plain one, over the branches of a parallel
    sub-layer (Hymba's attention beside Mamba: 1/2), over the mixer paths of a routed one.
    None when the model has no mixer."""
    from composer.core.registry import get_block
    n = a_sum = 0.0
    for nid, a in g.nodes(data=True):
        if a["op"] == "combine":
            kinds = [g.nodes[b]["kind"] for b in g.predecessors(nid)
                     if g.nodes[b]["op"] == "branch" and g.nodes[b]["role"] == "mixer"]
        elif a["op"] == "residual" and a["role"] == "mixer":
            kinds = ([p.kind for p in a["spec"].paths if get_block(p.kind).role == "mixer"]
                     if a["kind"] == "routed" else [a["kind"]])
        else:
            continue
        kinds = [k for k in kinds if k not in SHORT_MIXERS]
        if kinds:
            n += 1
            a_sum += sum(k in SOFTMAX_ATTENTION for k in kinds) / len(kinds)
    return a_sum / n if n else None


def run_costs(recipe: dict, context: int | None = None, cache: dict | None = None) -> dict:
    """``params``, ``flops_per_token`` and ``state_bytes`` (:func:`composer.build.costs.totals`)
    at ``context`` tokens (default: the recipe's ``data.seq_len``), ``context``,
    ``attention_share`` and ``schedule`` (the pattern) of a recipe dict (a checkpoint's
    recipe.json). Raises :class:`HycompError` for a recipe that does not validate."""
    from composer.build.costs import layer_graph, totals
    from composer.recipe.validate import validate_recipe
    validated = validate_recipe(recipe)
    T = context or validated.data.seq_len
    key = (json.dumps(recipe.get("model"), sort_keys=True), T)
    cache = {} if cache is None else cache
    if key not in cache:
        g = layer_graph(validated)
        cache[key] = {**totals(g, T), "context": T, "attention_share": attention_share(g),
                      "schedule": g.graph["pattern"]}
    return cache[key]


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """What :mod:`composer.run.compare_table` writes and :mod:`composer.run.compare_plots`
    draws."""
    rows: list[dict]                    # the main table: the best run of each group
    all_rows: list[dict]                # every run, in collect's order
    columns: list[tuple[str, str]]      # (row key, header) of the main table
    all_columns: list[tuple[str, str]]
    varies: list[str]                   # the keys whose values differ among the runs
    short: dict[str, str]               # key -> short name
    notes: list[str]
    settings: dict


def _value(r: RunRecord, key: str, pick=None) -> float | None:
    """summary.json's ``key`` when finite, else from metrics.jsonl's rows: the last value, or
    ``pick`` (min / max) over them."""
    v = r.summary.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    column = "val_loss" if key == "best_val_loss" else "val_acc" if key == "best_val_acc" \
        else key
    vals = [float(m[column]) for m in r.metrics if isinstance(m.get(column), (int, float))
            and math.isfinite(m[column])]
    if not vals:
        return None
    return pick(vals) if pick else vals[-1]


def _eval_columns(r: RunRecord) -> dict[str, float]:
    """``acc <task>@<seq_len>`` (``bpb ...`` for text) per eval.json result; results of one
    task and length with other settings get those settings appended (``num_pairs=16``)."""
    results = [x for x in (r.eval or {}).get("results", []) if isinstance(x, dict)]
    groups = Counter((x.get("task"), x.get("seq_len")) for x in results)
    out = {}
    for res in results:
        where = f"{res.get('task')}@{res.get('seq_len')}"
        if groups[(res.get("task"), res.get("seq_len"))] > 1:
            same = [x.get("settings") or {} for x in results
                    if (x.get("task"), x.get("seq_len")) == (res.get("task"), res.get("seq_len"))]
            mine = res.get("settings") or {}
            where += "".join(f" {k}={_show(v)}" for k, v in mine.items()
                             if any(o.get(k) != v for o in same))
        if finite(res.get("accuracy")):
            out[f"acc {where}"] = float(res["accuracy"])
        elif finite(res.get("bpb")):
            out[f"bpb {where}"] = float(res["bpb"])
    return out


def _row(r: RunRecord, shown: dict, keys: list[str], costs: dict | None) -> dict:
    task = r.task
    costs = costs or {}
    row = {"label": "", "name": r.name, "path": str(r.path), "task": task,
           "schedule": costs.get("schedule") or r.summary.get("schedule"),
           **{k: shown[k] for k in keys},
           "params": costs.get("params", r.summary.get("params")),
           "flops_per_token": costs.get("flops_per_token"),
           "state_bytes": costs.get("state_bytes"), "context": costs.get("context"),
           "attention_share": costs.get("attention_share"),
           "val_loss": _value(r, "val_loss"), "best_val_loss": _value(r, "best_val_loss", min),
           "val_bpb": None, "val_acc": None, "best_val_acc": None}
    if task == "text":
        bpb = _value(r, "val_bpb")
        if bpb is None and row["val_loss"] is not None:
            bpb = row["val_loss"] / math.log(2)
        row["val_bpb"] = bpb
    else:
        row["val_acc"] = _value(r, "val_acc")
        row["best_val_acc"] = _value(r, "best_val_acc", max)
    row.update(_eval_columns(r))
    row.update(tokens_per_s=_value(r, "tokens_per_s"), wall_s=_value(r, "wall_s"),
               status=str(r.summary.get("status", "?")))
    return row


def rank(row: dict) -> tuple:
    """Sort key of the best run first: the highest accuracy (task runs), then the lowest
    validation loss; missing values last."""
    loss = row.get("val_loss")
    loss_key = (0, loss) if finite(loss) else (1, 0.0)
    if row.get("task", "text") == "text":
        return loss_key
    acc = row.get("val_acc")
    return ((0, -acc) if finite(acc) else (1, 0.0)) + loss_key


def _match_key(key: str, keys: list[str]) -> str | None:
    """``key`` itself when it differs among the runs, else the one differing key that ends in
    ``.key`` (``lr`` for ``train.lr``)."""
    if key in keys:
        return key
    ends = [k for k in keys if k.endswith("." + key)]
    return ends[0] if len(ends) == 1 else None


def compare(records: list[RunRecord], context: int | None = None,
            best_over: str | None = "train.lr", notes: list[str] | None = None) -> Comparison:
    """One row per run, and the main table with only the best run of each group of runs
    that differ in ``best_over`` alone (None: every run). ``context``: T of the costs
    (default each run's ``data.seq_len``). Notes (skipped costs, the collapse) go to
    ``notes``."""
    notes = [] if notes is None else notes
    keys, shown, compared = differences(records)
    short = short_names(keys)
    cache: dict = {}
    rows = []
    for r, s in zip(records, shown):
        try:
            costs = run_costs(r.recipe, context, cache)
        except HycompError as e:
            notes.append(f"warning: no costs for {r.name}: its recipe.json does not validate "
                         f"({e.what})")
            costs = None
        rows.append(_row(r, s, keys, costs))
    labels = _labels(records, shown, keys, short, lambda r: str(r.summary.get("label") or r.name))
    for row, label in zip(rows, labels):
        row["label"] = label
    if len(keys) > MAX_LABEL_KEYS:
        notes.append(f"note: {len(keys)} keys differ; labels name the first "
                     f"{MAX_LABEL_KEYS}, the table has them all")
    over = _match_key(best_over, keys) if best_over else None
    main, main_keys = rows, keys
    if best_over and over is None:
        notes.append(f"note: every run kept: {best_over} is the same in all of them")
    elif over is not None:
        main, main_keys = _best_rows(records, rows, shown, compared, keys, short, over), \
            [k for k in keys if k != over]
        notes.append(f"note: {len(main)} of {len(rows)} runs shown: the best {over} of each "
                     f"configuration (compare_all.md lists every run)")
    settings = {"context": context, "best_over": over, "runs": len(rows), "rows": len(main),
                "varies": keys}
    return Comparison(rows=main, all_rows=rows, columns=_columns(main, main_keys, short, over),
                      all_columns=_columns(rows, keys, short, None), varies=keys, short=short,
                      notes=notes, settings=settings)


def _best_rows(records, rows, shown, compared, keys, short, over) -> list[dict]:
    """The best row of each group of rows equal in every key but ``over`` (and the task),
    with ``best <over>`` (the winning value) and ``tried`` (the group's size)."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        group = tuple(_key(compared[i][k]) for k in keys if k != over) + (row["task"],)
        groups.setdefault(group, []).append(i)
    winners = [min(members, key=lambda i: rank(rows[i])) for members in groups.values()]
    rest = [k for k in keys if k != over]
    labels = _labels([records[i] for i in winners], [shown[i] for i in winners], rest, short,
                     lambda r: r.name)
    out = []
    for i, members, label in zip(winners, groups.values(), labels):
        row = {k: v for k, v in rows[i].items() if k != over}
        row.update(label=label, **{f"best {over}": shown[i][over], "tried": len(members)})
        out.append(row)
    return out


def _columns(rows: list[dict], keys: list[str], short: dict, over: str | None) -> list:
    """(row key, header) pairs of a table, less the columns no row has a value in."""
    contexts = {r["context"] for r in rows if r.get("context") is not None}
    at = f" @{contexts.pop()}" if len(contexts) == 1 else ""
    evals = sorted({k for r in rows for k in r if k.startswith(("acc ", "bpb "))},
                   key=_natural_text)
    # a swept pattern that is the schedule itself (Megatron counting) needs no second column
    keys = [k for k in keys if not (k == "model.schedule.pattern" and all(
        str(r.get(k)) == str(r.get("schedule")) for r in rows))]
    cols = [("label", "run"), ("schedule", "schedule"), *[(k, short[k]) for k in keys]]
    if over:
        cols += [(f"best {over}", f"best {short[over]}"), ("tried", "tried")]
    cols += [("params", "params"), ("flops_per_token", f"FLOP/token{at}"),
             ("state_bytes", f"state{at}")]
    if not at:
        cols.append(("context", "T"))
    cols += [("attention_share", "attn share"), ("val_loss", "val loss"),
             ("best_val_loss", "best val loss"), ("val_bpb", "val bpb"), ("val_acc", "val acc"),
             ("best_val_acc", "best acc"), *[(k, k) for k in evals],
             ("tokens_per_s", "tok/s"), ("wall_s", "wall"), ("status", "status")]
    return [(k, h) for k, h in cols
            if k in ("label", "status") or any(r.get(k) is not None for r in rows)]
