"""Fuzz the recipe language: generated recipes and override sets either validate and build, or
are refused with the project's user error.

    python tools/fuzz_recipes.py --seconds 300                 # all strategies, 5 minutes
    python tools/fuzz_recipes.py --examples 2000 --seed 7 --strategy overrides

The property, for every generated case:

(a) it validates, and then :func:`composer.layer_graph` builds a graph whose parameter total
    equals the model built on the meta device (``with torch.device("meta"):
    composer.build_model(recipe)``, the sum of ``numel``); or
(b) it raises :class:`composer.core.errors.HycompError` (or a subclass) -- no other exception
    escapes (TypeError, ValueError, IndexError, ZeroDivisionError, RecursionError, MemoryError,
    Pydantic's ValidationError, Hydra's or OmegaConf's errors ...). A user error raised by
    ``layer_graph`` after validation (a size limit checked where the model is laid out) counts
    as refused too, and is counted apart ("by layer_graph"); and
(c) it answers within seconds (``--case-seconds``; the tests use Hypothesis' ``deadline``).

Three strategies generate the cases, all derived from the schema itself: the Pydantic models of
:mod:`composer.recipe.schema` are walked field by field (type, ``Literal`` choices, ``Field``
bounds ge/gt/le/lt, nested models, dict fields), the block specs come from the block registry
(:func:`composer.core.registry.block_types`), kernel ops and backends from the kernel registry.
Each value is drawn valid, at an edge (0, -1, the bound and one past it, 1e9, 10**12, NaN, inf)
or of a wrong type, with a per-case "chaos" level setting how often values go bad, so both
outcomes stay frequent:

* :func:`recipe_dicts`: whole recipe dicts for :func:`composer.validate_recipe`: block names
  and kinds, symbols, shared blocks, every schedule form (ratio + blocks with even/period
  placement and offset, pattern strings with ``|``, explicit layer lists, segments) and
  per-layer overrides with selectors, unknown keys, names and symbols;
* :func:`override_sets`: ``(recipe name, Hydra override strings)`` for
  :func:`composer.load_recipe`, as users write them (``model.d_model=0``,
  ``model.schedule.pattern='M-*'``, ``model=jamba_tiny``, ``+key=v``, ``~key``, sweeps,
  interpolations, unparsable lines);
* :func:`recipe_files`: the bytes of a recipe file given by path (YAML root configs, model
  recipes given as roots, binary junk, broken YAML, Python tags).

Where the strategies live. Here, in the tool, and ``tests/recipe/test_properties.py`` loads
this file by path (``importlib``; ``tools/`` is not a package). The other way round -- the tool
loading the test module -- would make a maintenance script depend on the test tree (pytest,
``tests/helpers.py``, its ``sys.path`` setup) and run test-module import side effects; the
strategies and the case checker are a self-contained generator, which the test merely runs a
fixed, derandomised few hundred cases of while this tool runs it for as long as you like.

Output: counts of cases, validated, refused with a user error and escaped, per strategy and in
all, and each distinct escape (exception type and the line that raised it) with its first
reproductions; with shrinking on (the default) Hypothesis shrinks the first case of each new
escape to a minimal one before the search goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis import strategies as st
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:            # run from a checkout without an install
    sys.path.insert(0, str(ROOT))

import composer  # noqa: E402
from composer.core.block import BlockSpec, Spec  # noqa: E402
from composer.core.errors import HycompError  # noqa: E402
from composer.core.registry import block_types, default_symbols, ops  # noqa: E402
from composer.recipe import schema  # noqa: E402
from composer.recipe.tasks import TASKS  # noqa: E402
from composer.recipe.schedule import MEGATRON_SYMBOLS as MEGATRON  # noqa: E402

# --------------------------------------------------------------------------------------------
# What the schema and the registries offer
# --------------------------------------------------------------------------------------------
CUSTOM_NAMES = ["local", "swa", "glob", "par", "hyb", "fast", "ffn2", "S1"]
UNKNOWN_NAMES = ["attn", "mamba3", "Mamba2", "", "parallel_", "a.b", "x y"]
UNKNOWN_KEYS = ["n_layer", "dmodel", "_target_", "bogus", "Blocks", ""]
SYMBOL_POOL = ["S", "A", "Q", "x", "k", "M", "*", "|", " ", "", "AB", "é", "?", "-"]
PACKAGED_DIR = ROOT / "recipes" / "model"


def _packaged() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(PACKAGED_DIR.glob("*.yaml"))}


PACKAGED = _packaged()


def _kinds(role: str | None = None, composite: bool | None = None) -> list[str]:
    out = []
    for name, bt in sorted(block_types().items()):
        if role is not None and bt.role != role:
            continue
        if composite is False and bt.role == "composite":
            continue
        out.append(name)
    return out


# Caps on valid integers by field name, so cases that validate stay cheap to build
# (widths up to 256, depths up to 64); fields not listed get 1..16 above their lower bound.
INT_CAPS = {
    "d_model": 256, "vocab_size": 1024, "max_seq_len": 4096, "n_layers": 64, "d_ff": 512,
    "lru_width": 256, "window": 2048, "block_size": 256, "seq_len": 4096, "n_global": 64,
    "chunk_size": 128, "head_dim": 64, "head_k_dim": 64, "head_v_dim": 64, "d_state": 64,
    "steps": 10**6, "batch_size": 512, "warmup_steps": 1000, "max_bytes": 10**9,
    "eval_every": 1000, "log_every": 1000, "ckpt_every": 1000, "seed": 10**6,
    "indices": 64, "offset": 16, "every": 8, "first": 16, "last": 16, "n_experts": 8,
    "top_k": 4, "expand": 4, "n_heads": 8, "n_kv_heads": 8, "n_k_heads": 8, "n_v_heads": 8,
}
NICE_WIDTHS = [8, 16, 24, 32, 48, 64, 96, 128, 256]


@dataclass
class Ctx:
    """Per-case knobs: ``chaos`` is the percentage of values drawn bad (edge or wrong type)."""

    chaos: int
    names: list[str] = field(default_factory=list)     # block names a schedule may use
    symbols: dict[str, str] = field(default_factory=dict)
    depth: int = 8                                     # rough number of schedule entries
    kind_of: dict[str, str] = field(default_factory=dict)   # block name -> registered type
    placed: list[str] = field(default_factory=list)    # names the schedule form places


def _chance(draw, pct: float) -> bool:
    """True with probability pct %; shrinks to False."""
    return draw(st.integers(0, 99)) >= 100 - pct


def _bad(draw, ctx: Ctx) -> str | None:
    """None (a valid value), 'edge' or 'wrong' (type), per the case's chaos."""
    if not _chance(draw, ctx.chaos):
        return None
    return draw(st.sampled_from(["edge", "edge", "wrong"]))


def _bounds(info) -> tuple[Any, Any, bool, bool, int | None]:
    lo = hi = None
    lo_strict = hi_strict = False
    min_len = None
    for m in getattr(info, "metadata", None) or []:
        if getattr(m, "ge", None) is not None:
            lo = m.ge
        if getattr(m, "gt", None) is not None:
            lo, lo_strict = m.gt, True
        if getattr(m, "le", None) is not None:
            hi = m.le
        if getattr(m, "lt", None) is not None:
            hi, hi_strict = m.lt, True
        if getattr(m, "min_length", None) is not None:
            min_len = m.min_length
    return lo, hi, lo_strict, hi_strict, min_len


def _unwrap(ann) -> tuple[Any, bool]:
    """(annotation without None and Annotated, optional?)."""
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        optional = len(args) < len(typing.get_args(ann))
        inner = args[0] if len(args) == 1 else typing.Union[tuple(args)]
        inner, opt2 = _unwrap(inner)
        return inner, optional or opt2
    return ann, False


WRONG = ["", "abc", 1.5, [], {}, [1], True, "1e3", {"a": 1}]


def _wrong(draw, exclude: tuple = ()) -> Any:
    return draw(st.sampled_from([w for w in WRONG if not isinstance(w, exclude)] or WRONG))


# --------------------------------------------------------------------------------------------
# Values from annotations
# --------------------------------------------------------------------------------------------
def value(draw, ctx: Ctx, path: str, ann, info=None, depth: int = 0) -> Any:
    """A value for the field at ``path`` of annotation ``ann`` (FieldInfo ``info`` gives the
    bounds): valid, at an edge, or of a wrong type."""
    leaf = path.rsplit(".", 1)[-1]
    special = _SPECIAL.get(leaf) or _SPECIAL.get(path)
    if special is not None:
        return special(draw, ctx, path, ann, info)
    inner, optional = _unwrap(ann)
    if optional and _chance(draw, 25):
        return None
    bad = _bad(draw, ctx)
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = list(typing.get_args(inner))
        if bad == "edge":
            return draw(st.sampled_from(["", "bogus", str(choices[0]).upper(), None]))
        if bad == "wrong":
            return _wrong(draw, (str,))
        return draw(st.sampled_from(choices))
    if inner is bool:
        if bad == "edge":
            return draw(st.sampled_from(["yes", "true", 1, 0, "off"]))
        if bad == "wrong":
            return draw(st.sampled_from(["maybe", 2, [], 0.5]))
        return draw(st.booleans())
    if inner is int:
        return _int(draw, ctx, leaf, info, bad)
    if inner is float:
        return _float(draw, ctx, leaf, info, bad)
    if inner is str:
        if bad == "edge":
            return draw(st.sampled_from(["", " ", "${model.d_model}", "${nope}", "a" * 300]))
        if bad == "wrong":
            return _wrong(draw, (str,))
        return draw(st.sampled_from(["auto", "cpu", "x", "runs/x", "**/*.txt"]))
    if origin is tuple:
        args = typing.get_args(inner)
        if bad == "edge":
            return draw(st.sampled_from([[], [1.0], [1.0, 2.0, 3.0], [0.2, 0.1], [math.nan, 1]]))
        if bad == "wrong":
            return _wrong(draw, (list,))
        return [value(draw, ctx, f"{path}[{i}]", a, None, depth + 1) for i, a in enumerate(args)]
    if origin is list:
        (item,) = typing.get_args(inner)
        if bad == "wrong":
            return _wrong(draw, (list,))
        n = 0 if bad == "edge" else draw(st.integers(0, 3))
        return [value(draw, ctx, f"{path}[]", item, None, depth + 1) for _ in range(n)]
    if origin is dict:
        if bad == "wrong":
            return _wrong(draw, (dict,))
        return {}
    if isinstance(inner, type) and issubclass(inner, BlockSpec) and inner is BlockSpec:
        return path_spec(draw, ctx, depth)
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        if bad == "wrong":
            return _wrong(draw, (dict,))
        return spec_dict(draw, ctx, path, inner, depth=depth + 1)
    if inner is Any:
        return draw(st.sampled_from([1, "x", None, [1, 2], {"a": 1}, 0.5]))
    return draw(st.sampled_from([None, 1, "x"]))


def _int(draw, ctx, leaf, info, bad) -> Any:
    lo, hi, lo_strict, hi_strict, _ = _bounds(info)
    lo_ok = None if lo is None else (lo + 1 if lo_strict else lo)
    hi_ok = None if hi is None else (hi - 1 if hi_strict else hi)
    if bad == "edge":
        edges = [0, -1, 10**9, 10**12, -(10**12), 2**63]
        if lo_ok is not None:
            edges += [lo_ok, lo_ok - 1]
        if hi_ok is not None:
            edges += [hi_ok, hi_ok + 1]
        if leaf == "n_layers":
            edges.append(100_000)
        return draw(st.sampled_from(sorted(set(edges))))
    if bad == "wrong":
        return draw(st.sampled_from(["", "abc", 1.5, math.nan, math.inf, [], {}, [1], "12"]))
    base = lo_ok if lo_ok is not None else 0
    top = base + INT_CAPS.get(leaf, 16)
    if hi_ok is not None:
        top = min(top, hi_ok)
    top = max(base, top)
    if leaf == "d_model":
        return draw(st.one_of(st.sampled_from(NICE_WIDTHS), st.integers(max(base, 1), top)))
    # mostly the default or a power of two (widths split into heads), else anything in range
    default = getattr(info, "default", None)
    nice = [2**i for i in range(12) if base <= 2**i <= top]
    if isinstance(default, int) and not isinstance(default, bool) and base <= default <= top:
        nice = [default, default] + nice
    if nice and not _chance(draw, 25):
        return draw(st.sampled_from(nice))
    return draw(st.integers(base, top))


def _float(draw, ctx, leaf, info, bad) -> Any:
    lo, hi, lo_strict, hi_strict, _ = _bounds(info)
    if bad == "edge":
        edges = [0.0, -1.0, math.nan, math.inf, -math.inf, 1e9, 1e-300, 1e308]
        edges += [b for b in (lo, hi) if b is not None]
        return draw(st.sampled_from(edges))
    if bad == "wrong":
        return draw(st.sampled_from(["", "abc", [], {}, [1.0], "nan"]))
    default = getattr(info, "default", None)
    if isinstance(default, (int, float)) and not isinstance(default, bool) and not _chance(
            draw, 30):
        return float(default)
    low = 0.0 if lo is None else float(lo)
    high = float(hi) if hi is not None else max(low, 0.0) + 100.0
    return draw(st.floats(low, high, exclude_min=lo_strict, exclude_max=hi_strict,
                          allow_nan=False, allow_infinity=False))


def spec_dict(draw, ctx: Ctx, path: str, cls: type, *, depth: int = 0, keep: int = 35,
              skip: tuple = ("kind",)) -> Any:
    """A dict for the Pydantic model ``cls``: each field kept with probability keep %, plus
    an unknown key now and then."""
    out: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        required = info.is_required()
        if required or _chance(draw, keep):
            out[name] = value(draw, ctx, f"{path}.{name}", info.annotation, info, depth)
    if _chance(draw, ctx.chaos / 3):
        out[draw(st.sampled_from(UNKNOWN_KEYS + [f"{n}s" for n in cls.model_fields]))] = 1
    return out


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
def block_settings(draw, ctx: Ctx, name: str, kind: str, depth: int = 0) -> dict:
    """Settings for block ``name`` of registered type ``kind``, from its registered spec."""
    bt = block_types()[kind]
    return spec_dict(draw, ctx, f"model.blocks.{name}", bt.spec, depth=depth)


def path_spec(draw, ctx: Ctx, depth: int) -> Any:
    """One entry of a routed block's ``paths``: a type name or inline settings with kind."""
    kinds = _kinds(composite=False)
    if depth > 2 or _chance(draw, 30):       # a bare type name (or a bad one)
        bad = _bad(draw, ctx)
        if bad:
            return draw(st.sampled_from(["parallel", "attn", "", 3, None]))
        return draw(st.sampled_from(kinds))
    kind = draw(st.sampled_from(kinds))
    if _bad(draw, ctx):
        kind = draw(st.sampled_from(["parallel", "attn", ""]))
        return {"kind": kind}
    return {"kind": kind, **block_settings(draw, ctx, "path", kind, depth + 1)}


def _branches(draw, ctx, path, ann, info) -> Any:
    """A parallel block's branches: block names of the recipe (possibly another parallel)."""
    bad = _bad(draw, ctx)
    if bad == "wrong":
        return _wrong(draw, (list,))
    pool = ctx.names or _kinds(role="mixer")
    n = draw(st.integers(0, 1)) if bad == "edge" else draw(st.integers(2, 3))
    out = [draw(st.sampled_from(pool)) for _ in range(n)]
    if bad == "edge" and _chance(draw, 50):
        out += [draw(st.sampled_from(UNKNOWN_NAMES + ["mlp", "parallel"]))]
    return out


def _block_name(draw, ctx, path=None, ann=None, info=None) -> Any:
    bad = _bad(draw, ctx)
    if bad == "wrong":
        return _wrong(draw, (str,))
    if bad == "edge":
        return draw(st.sampled_from(UNKNOWN_NAMES))
    return draw(st.sampled_from(ctx.names or _kinds(composite=False)))


def _ffn_name(draw, ctx, path=None, ann=None, info=None) -> Any:
    if _chance(draw, 15):
        return None
    bad = _bad(draw, ctx)
    if bad == "wrong":
        return _wrong(draw, (str,))
    if bad == "edge":
        return draw(st.sampled_from(UNKNOWN_NAMES + ["attention", "mamba2", "parallel"]))
    ffns = [n for n in ctx.names if n in _kinds(role="ffn") or n in ("ffn2",)]
    return draw(st.sampled_from(ffns or ["mlp", "moe"]))


def _width(draw, ctx, path, ann, info) -> Any:
    bad = _bad(draw, ctx)
    if bad:
        return _int(draw, ctx, "d_model", info, bad)
    return draw(st.sampled_from(NICE_WIDTHS))


def _dt_limit(draw, ctx, path, ann, info) -> Any:
    bad = _bad(draw, ctx)
    if bad == "wrong":
        return _wrong(draw, (list,))
    if bad == "edge":
        return draw(st.sampled_from([[], [0.1], [0.2, 0.1], [math.nan, 1.0], [-1.0, 1.0],
                                     [0.0, math.inf], [1, 2, 3]]))
    if _chance(draw, 50):
        return None
    a = draw(st.floats(0.0, 1.0))
    return [a, a + draw(st.floats(0.0, 10.0))]


_SPECIAL: dict[str, Callable] = {
    "branches": _branches,
    "model.ffn": _ffn_name,
    "d_model": _width,
    "dt_limit": _dt_limit,
}


def blocks_section(draw, ctx: Ctx) -> dict:
    """``model.blocks``: registered types under their own names and new names with a kind."""
    out: dict[str, Any] = {}
    plan: list[tuple[str, str | None]] = []
    for _ in range(draw(st.integers(0, 4))):
        if _chance(draw, 40):
            name = draw(st.sampled_from(CUSTOM_NAMES))
            kind = draw(st.sampled_from(_kinds()))
            plan.append((name, kind))
        else:
            kind = draw(st.sampled_from(_kinds()))
            plan.append((kind, kind))
    if _chance(draw, ctx.chaos / 2):
        plan.append((draw(st.sampled_from(CUSTOM_NAMES + UNKNOWN_NAMES)), None))
    ctx.names = sorted(set(_kinds(composite=False)) | {n for n, _ in plan})
    ctx.kind_of = {**{k: k for k in _kinds()}, **{n: k for n, k in plan if k}}
    for name, kind in plan:
        if kind is None:                       # missing or unknown kind, or not a mapping
            out[name] = draw(st.sampled_from([{}, {"kind": "attn"}, {"kind": ""}, 3, None,
                                              "attention", [], {"kind": 7}]))
            continue
        settings_ = block_settings(draw, ctx, name, kind)
        if name != kind or _chance(draw, 20):
            settings_ = {"kind": kind, **settings_}
        out[name] = settings_
    return out


def symbols_section(draw, ctx: Ctx) -> dict:
    out = {}
    for _ in range(draw(st.integers(0, 2))):
        sym = draw(st.sampled_from(SYMBOL_POOL if ctx.chaos else ["S", "A", "Q", "x", "k"]))
        out[sym] = _block_name(draw, ctx)
    return out


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
def symbol_table(ctx: Ctx) -> dict[str, str]:
    table = dict(MEGATRON)
    table.update(default_symbols())
    table.update({k: v for k, v in ctx.symbols.items() if isinstance(k, str)})
    return table


def ratio_form(draw, ctx: Ctx) -> tuple[dict, int | None]:
    bad = _bad(draw, ctx)
    k = draw(st.integers(1, 3))
    parts = [draw(st.integers(0, 7)) for _ in range(k)]
    if sum(parts) == 0 and not bad:
        parts[0] = 1
    ratio: Any = ":".join(map(str, parts))
    if bad == "edge":
        ratio = draw(st.sampled_from(["0:0", "3:-1", "a:b", "3::1", "", " 3 : 1 ", "3:1:",
                                      "1000000000000:1", "1e9:1", "3/1", ratio]))
    elif bad == "wrong":
        ratio = draw(st.sampled_from([181, 3.5, True, parts, [3, "x"], {"a": 1}]))
    names = [draw(st.sampled_from(ctx.names or ["mamba2", "attention"])) for _ in range(k)]
    ctx.placed += names
    if _bad(draw, ctx):
        names = draw(st.sampled_from([[], names[:-1], names + ["attention"],
                                      [draw(st.sampled_from(UNKNOWN_NAMES))] * k, None]))
    form: dict[str, Any] = {"ratio": ratio, "blocks": names}
    if _chance(draw, 60):
        form["placement"] = value(draw, ctx, "model.schedule.placement",
                                  schema.ScheduleForms.model_fields["placement"].annotation)
    if _chance(draw, 40):
        info = schema.ScheduleForms.model_fields["offset"]
        form["offset"] = value(draw, ctx, "model.schedule.offset", info.annotation, info)
    return form, None


def pattern_text(draw, ctx: Ctx) -> tuple[Any, int]:
    table = symbol_table(ctx)
    syms = sorted(s for s, n in table.items() if isinstance(s, str) and len(s) == 1
                  and (n != "parallel" or n in ctx.names or _chance(draw, ctx.chaos)))
    n = draw(st.integers(1, 12))
    chars = [draw(st.sampled_from(syms)) for _ in range(n)]
    ctx.placed += [table[c] for c in chars]
    text = ""
    for c in chars:
        if _chance(draw, 10):
            text += draw(st.sampled_from(["|", " ", " | "]))
        text += c
    bad = _bad(draw, ctx)
    if bad == "edge":
        text = draw(st.sampled_from(["", "|", "| |", "Z", "M?M", "M\n*", text + "é",
                                     text + "Z", "M" * 64, "\x00"]))
    elif bad == "wrong":
        text = draw(st.sampled_from([3, ["M", "*"], True, {"M": 1}]))
    return text, n


def layers_list(draw, ctx: Ctx) -> tuple[Any, int]:
    n = draw(st.integers(1, 8))
    out: Any = [draw(st.sampled_from(ctx.names or ["mamba2", "attention"])) for _ in range(n)]
    ctx.placed += out
    bad = _bad(draw, ctx)
    if bad == "edge":
        out = draw(st.sampled_from([[], out + [draw(st.sampled_from(UNKNOWN_NAMES))],
                                    out + ["parallel"], [None], out * 8]))
    elif bad == "wrong":
        out = draw(st.sampled_from(["mamba2", 3, [1, 2], {"a": "b"}]))
    return out, (len(out) if isinstance(out, list) else 1)


def one_form(draw, ctx: Ctx, *, segments_ok: bool) -> tuple[dict, int | None]:
    """A schedule form: ratio, pattern, layers (or segments at the top), sometimes two or
    none."""
    forms = ["ratio", "pattern", "layers"] + (["segments"] if segments_ok else [])
    form = draw(st.sampled_from(forms))
    if form == "ratio":
        out, n = ratio_form(draw, ctx)
    elif form == "pattern":
        text, n = pattern_text(draw, ctx)
        out = {"pattern": text}
    elif form == "layers":
        lst, n = layers_list(draw, ctx)
        out = {"layers": lst}
    else:
        out, n = segments_form(draw, ctx)
    if _chance(draw, ctx.chaos / 4):          # a second form, or none at all
        if _chance(draw, 50):
            out = {}
        else:
            other, _ = one_form(draw, ctx, segments_ok=False)
            out = {**other, **out}
    return out, n


def segments_form(draw, ctx: Ctx) -> tuple[dict, int]:
    segs, total = [], 0
    for _ in range(draw(st.integers(1, 3))):
        form, n = one_form(draw, ctx, segments_ok=False)
        depth = n if n is not None and not _chance(draw, 15) else draw(st.integers(1, 8))
        if _bad(draw, ctx):
            depth = draw(st.sampled_from([0, -1, None, "2", 10**12, 100_000]))
        seg = {"n_layers": depth, **form} if depth is not None else dict(form)
        if _chance(draw, ctx.chaos / 4):
            seg["segments"] = [{"n_layers": 1, "pattern": "M"}]
        segs.append(seg)
        total += depth if isinstance(depth, int) and 0 < depth < 1000 else 1
    bad = _bad(draw, ctx)
    if bad == "edge":
        return {"segments": []}, 0
    if bad == "wrong":
        return {"segments": _wrong(draw, (list,))}, 0
    return {"segments": segs}, total


def selector(draw, ctx: Ctx) -> Any:
    if _bad(draw, ctx) == "wrong":
        return _wrong(draw, (dict,))
    n = max(ctx.depth, 1)
    out: dict[str, Any] = {}
    if _chance(draw, 35):
        idx = [draw(st.integers(-n, n - 1)) for _ in range(draw(st.integers(0, 3)))]
        if _bad(draw, ctx):
            idx = draw(st.sampled_from([[n], [-n - 1], [10**12], ["a"], 3, [1.5], None]))
        out["indices"] = idx
    for key in ("every", "offset", "first", "last"):
        if _chance(draw, 30):
            info = schema.Selector.model_fields[key]
            out[key] = value(draw, ctx, f"model.schedule.overrides[].select.{key}",
                             info.annotation, info)
    if _chance(draw, 25):
        out["block"] = _block_name(draw, ctx)
    if _chance(draw, ctx.chaos / 3):
        out[draw(st.sampled_from(UNKNOWN_KEYS + ["index", "step"]))] = 1
    return out


def layer_override(draw, ctx: Ctx) -> Any:
    if _bad(draw, ctx) == "wrong":
        return _wrong(draw, (dict,))
    out: dict[str, Any] = {} if _chance(draw, ctx.chaos / 4) else {"select": selector(draw, ctx)}
    what = draw(st.sampled_from(["set", "block", "ffn", "set+block"]))
    if "block" in what:
        out["block"] = _block_name(draw, ctx)
    if what == "ffn":
        out["ffn"] = _ffn_name(draw, ctx)
    if "set" in what:
        # fields of a block the schedule places, selected by name (other blocks lack them)
        name = draw(st.sampled_from(ctx.placed or ctx.names or _kinds(composite=False)))
        kind = ctx.kind_of.get(name, name)
        if kind not in block_types():
            kind = draw(st.sampled_from(_kinds(composite=False)))
        fields = block_settings(draw, ctx, f"override.{kind}", kind)
        if isinstance(out.get("select"), dict) and not _chance(draw, 25):
            out["select"]["block"] = name
        if _chance(draw, ctx.chaos / 2):
            fields[draw(st.sampled_from(["kind", "nope", "window", "n_heads"]))] = (
                draw(st.sampled_from(["mamba2", 0, None, 7])))
        out["set"] = fields
    return out


def schedule_section(draw, ctx: Ctx) -> tuple[dict, int | None]:
    form, n = one_form(draw, ctx, segments_ok=True)
    ctx.depth = n or 8
    sched = dict(form)
    if _chance(draw, 35):
        sched["overrides"] = [layer_override(draw, ctx) for _ in range(draw(st.integers(1, 3)))]
    if _chance(draw, ctx.chaos / 4):
        sched[draw(st.sampled_from(UNKNOWN_KEYS + ["form", "ratios"]))] = "x"
    return sched, n


def depth_for(draw, ctx: Ctx, natural: int | None, required: bool = False) -> Any:
    """model.n_layers: null, the form's own length, a multiple, any depth up to 64, or bad."""
    bad = _bad(draw, ctx)
    if bad:
        info = schema.ModelConfig.model_fields["n_layers"]
        return _int(draw, ctx, "n_layers", info, bad)
    options = ([] if required else [None]) + [draw(st.integers(1, 16))]
    if natural:
        options += [natural, min(64, natural * draw(st.integers(1, 4)))]
    if _chance(draw, 10):
        options.append(draw(st.integers(17, 64)))
    return draw(st.sampled_from(options))


# --------------------------------------------------------------------------------------------
# Whole recipes
# --------------------------------------------------------------------------------------------
def _chaos(draw) -> int:
    return draw(st.sampled_from([0, 0, 3, 10, 30]))


def model_section(draw, ctx: Ctx) -> dict:
    model: dict[str, Any] = {}
    model["blocks"] = blocks_section(draw, ctx)
    ctx.symbols = symbols_section(draw, ctx)
    if ctx.symbols or _chance(draw, 10):
        model["symbols"] = ctx.symbols
    sched, natural = schedule_section(draw, ctx)
    model["schedule"] = sched
    if "ratio" in sched:
        model["n_layers"] = depth_for(draw, ctx, natural, required=True)
    elif _chance(draw, 60):
        model["n_layers"] = depth_for(draw, ctx, natural)
    if _chance(draw, 30):
        model["ffn"] = _ffn_name(draw, ctx)
    if _chance(draw, 15):
        pool = [n for n in ctx.names if n not in ("parallel",)]
        model["shared"] = [draw(st.sampled_from(pool + UNKNOWN_NAMES[:2]))
                           for _ in range(draw(st.integers(1, 2)))]
    for name, info in schema.ModelConfig.model_fields.items():
        if name in model or name in ("blocks", "symbols", "schedule", "shared", "ffn"):
            continue
        if _chance(draw, 45 if name == "d_model" else 20):
            model[name] = value(draw, ctx, f"model.{name}", info.annotation, info)
    if _chance(draw, ctx.chaos / 3):
        model[draw(st.sampled_from(UNKNOWN_KEYS))] = 1
    return model


def kernels_section(draw, ctx: Ctx) -> Any:
    table = ops()
    out: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(sorted(table)))
        choice: Any = draw(st.sampled_from(["auto", *sorted(table[op])]))
        bad = _bad(draw, ctx)
        if bad == "edge":
            op, choice = draw(st.sampled_from([(op, "fast"), ("selective_scan", "auto"),
                                               ("attn", "auto"), (op, ""), ("", "auto")]))
        elif bad == "wrong":
            choice = _wrong(draw, (str,))
        out[op] = choice
    return out


@st.composite
def recipe_dicts(draw) -> dict:
    """A whole recipe as a plain dict for :func:`composer.validate_recipe`."""
    ctx = Ctx(_chaos(draw))
    out: dict[str, Any] = {"model": model_section(draw, ctx)}
    for name in ("data", "train"):
        if _chance(draw, 30):
            cls = draw(st.sampled_from(_section_classes(name)))
            out[name] = spec_dict(draw, ctx, name, cls, keep=15)
    if _chance(draw, 30):
        out["kernels"] = kernels_section(draw, ctx)
    if _chance(draw, ctx.chaos / 4):
        section = draw(st.sampled_from(["model", "data", "train", "kernels", "optim"]))
        out[section] = draw(st.sampled_from([3, None, [], "x", {"x": 1}]))
    return out


# --------------------------------------------------------------------------------------------
# Hydra override strings
# --------------------------------------------------------------------------------------------
def hydra(v: Any) -> str:
    """A Python value in Hydra's override syntax."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra(x)}" for k, x in v.items()) + "}"
    return str(v)


def _leaf_fields(cls: type, prefix: str) -> list[tuple[str, Any, Any]]:
    """(key path, annotation, FieldInfo) of every field of ``cls``, nested models walked."""
    out = []
    for name, info in cls.model_fields.items():
        path = f"{prefix}.{name}"
        inner, _ = _unwrap(info.annotation)
        if isinstance(inner, type) and issubclass(inner, Spec) and name not in ("schedule",):
            out += _leaf_fields(inner, path)
        elif name == "schedule":
            out += _leaf_fields(schema.Schedule, path)
        else:
            out.append((path, info.annotation, info))
    return out


def _section_classes(name: str) -> list[type]:
    """The models a section validates against: ``data`` is text or one task's settings."""
    if name == "data":
        return [schema.DataConfig, *TASKS.values()]
    return [schema.Recipe.model_fields[name].annotation]


SCHEMA_KEYS = list({k[0]: k for sec in ("model", "data", "train")
                    for cls in _section_classes(sec)
                    for k in _leaf_fields(cls, sec)}.values())


def _base_blocks(model_name: str) -> dict[str, str]:
    """Block name -> kind of a packaged model recipe (registered types under their names)."""
    blocks = (PACKAGED.get(model_name) or {}).get("blocks") or {}
    out = {n: (s or {}).get("kind", n) for n, s in blocks.items()}
    return {n: k for n, k in out.items() if k in block_types()}


@functools.lru_cache(maxsize=None)
def _base_placed_cached(model_name: str) -> tuple[str, ...]:
    try:
        r = composer.load_recipe("config", [f"model={model_name}"])
    except HycompError:
        return ()
    return tuple(sorted({e.name for e in r.schedule.entries}))


def _base_placed(model_name: str) -> list[str]:
    """Block names the packaged model recipe's schedule places."""
    return list(_base_placed_cached(model_name))


def _override_line(draw, ctx: Ctx, base_model: str) -> list[str]:
    what = draw(st.sampled_from(["field", "field", "width", "block", "block", "new_block",
                                 "form", "form", "overrides", "kernels", "symbol", "unknown",
                                 "garbage", "prefix"]))
    if what == "field":
        path, ann, info = draw(st.sampled_from(SCHEMA_KEYS))
        if path.startswith("model.blocks") or path.startswith("model.symbols"):
            path = "model.d_model"
            ann, info = int, schema.ModelConfig.model_fields["d_model"]
        return [f"{path}={hydra(value(draw, ctx, path, ann, info))}"]
    if what == "width":
        return [f"model.d_model={hydra(_width(draw, ctx, '', None, None))}"]
    if what in ("block", "new_block"):
        blocks = _base_blocks(base_model) or {"attention": "attention"}
        if what == "new_block":
            name = draw(st.sampled_from(CUSTOM_NAMES))
            kind = draw(st.sampled_from(_kinds()))
            lines = [f"model.blocks.{name}.kind={hydra(kind)}"]
        else:
            name = draw(st.sampled_from(sorted(blocks)))
            kind, lines = blocks[name], []
        fields = block_settings(draw, ctx, name, kind)
        lines += [f"model.blocks.{name}.{k}={hydra(v)}" for k, v in fields.items()]
        return lines or [f"model.blocks.{name}.kind={hydra(kind)}"]
    if what == "form":
        form, n = one_form(draw, ctx, segments_ok=True)
        lines = [f"model.schedule.{k}={hydra(v)}" for k, v in form.items()]
        if _chance(draw, 40):
            lines.append(f"model.n_layers={hydra(depth_for(draw, ctx, n))}")
        return lines
    if what == "overrides":
        ovs = [layer_override(draw, ctx) for _ in range(draw(st.integers(1, 2)))]
        return [f"model.schedule.overrides={hydra(ovs)}"]
    if what == "kernels":
        return [f"kernels.{op}={hydra(c)}" for op, c in kernels_section(draw, ctx).items()]
    if what == "symbol":
        sym = draw(st.sampled_from(SYMBOL_POOL))
        return [f"model.symbols.{sym}={hydra(_block_name(draw, ctx))}"]
    if what == "unknown":
        return [draw(st.sampled_from(["model.n_layer=12", "model.blocks.attention.nheads=2",
                                      "foo.bar=1", "model.schedule.ratios='3:1'", "train.lr_=1",
                                      "model.blocks.mamba2.d_state.x=1", "data=nope",
                                      "train=gpu", "model=mamba_tiny"]))]
    if what == "garbage":
        return [draw(st.sampled_from(["model.d_model=", "=3", "model.d_model=[", "model..x=1",
                                      "model.d_model=1,2", "model.d_model=range(1,3)",
                                      "model.schedule.pattern=M-*", "model.d_model='3",
                                      "model.d_model=${model.n_layers}",
                                      "model.d_model=${nope}", "model.d_model=choice(1,2)",
                                      "model.schedule.ratio=3:1", "hydra.run.dir=/tmp/x",
                                      "model.schedule={}", "model.blocks=null", "model=null",
                                      "model.d_model={a:1}", " ", "model.d_model=1 2"]))]
    # prefixes: append, force-add, delete
    path, ann, info = draw(st.sampled_from(SCHEMA_KEYS))
    pre = draw(st.sampled_from(["+", "++", "~"]))
    if pre == "~":
        return [f"~{path}"]
    return [f"{pre}{path}={hydra(value(draw, ctx, path, ann, info))}"]


@st.composite
def override_sets(draw) -> tuple[str, list[str]]:
    """(recipe name, override strings) for :func:`composer.load_recipe`."""
    ctx = Ctx(_chaos(draw))
    ctx.names = sorted(block_types())
    name, base_model = "config", "hybrid_small"
    lines: list[str] = []
    if _chance(draw, 15):
        name = base_model = draw(st.sampled_from(sorted(PACKAGED)))
    elif _chance(draw, 25):
        base_model = draw(st.sampled_from(sorted(PACKAGED)))
        lines.append(f"model={base_model}")
    if _chance(draw, ctx.chaos / 3):
        name = draw(st.sampled_from(["nope", "", "model/jamba_tiny", "/nonexistent.yaml",
                                     "jamba", "recipes"]))
    ctx.names = sorted(set(_base_blocks(base_model)) | set(_kinds(composite=False)))
    ctx.kind_of = {**{k: k for k in _kinds()}, **_base_blocks(base_model)}
    ctx.placed = _base_placed(base_model)
    for _ in range(draw(st.integers(1, 4))):
        lines += _override_line(draw, ctx, base_model)
    return name, lines


# --------------------------------------------------------------------------------------------
# Recipe files
# --------------------------------------------------------------------------------------------
def _yaml_ready(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_yaml_ready(x) for x in v]
    if isinstance(v, dict):
        return {k: _yaml_ready(x) for k, x in v.items()}
    return v


@st.composite
def recipe_files(draw) -> bytes:
    """The bytes of a recipe file given to :func:`composer.load_recipe` by path."""
    kind = draw(st.sampled_from(["root", "root", "model_only", "binary", "broken", "tag"]))
    if kind in ("root", "model_only"):
        rec = draw(recipe_dicts())
        if kind == "model_only":
            rec = rec.get("model") if isinstance(rec.get("model"), dict) else {"d_model": 1}
        elif _chance(draw, 50):
            group = draw(st.sampled_from(sorted(PACKAGED) + ["nope"]))
            rec = {"defaults": [{"model": group}, "_self_"], **rec}
        return yaml.safe_dump(_yaml_ready(rec), allow_unicode=True).encode()
    if kind == "binary":
        return draw(st.binary(max_size=64))
    if kind == "broken":
        return draw(st.sampled_from([b"model: {d_model: 3", b"model:\n\t- x", b": :", b"",
                                     b"model: [1, 2]\nmodel: 3", b"\xff\xfe\x00m",
                                     b"model:\n  schedule:\n    ratio: 3:1\n",
                                     b"defaults: [nope]", b"defaults: 3", b"- 1\n- 2",
                                     b"model: &a [*a]", b"model: ${oc.env:NOPE_HYCOMP}"]))
    return draw(st.sampled_from([b"model: !!python/name:builtins.print ''",
                                 b"model: !!python/object/apply:builtins.len [[1]]",
                                 b"model: !!binary aGVsbG8="]))


def load_file(content: bytes) -> Any:
    """load_recipe on ``content`` written to a fresh temporary recipe file."""
    with tempfile.TemporaryDirectory(prefix="hycomp_fuzz_") as d:
        path = Path(d) / "recipe.yaml"
        path.write_bytes(content)
        return composer.load_recipe(str(path))


# --------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------
class TooSlow(BaseException):
    """Raised by the alarm when a case runs past the hard time limit (a BaseException, so no
    ``except Exception`` in the code under test swallows it)."""


class Escape(AssertionError):
    """A case broke the property (the original exception, if any, is the cause)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Interrupt the block with :class:`TooSlow` after ``seconds``, and again every half second
    after that (an exception raised inside a finaliser or a GC callback is swallowed, so one
    alarm is not enough). Main thread and POSIX only; elsewhere no limit."""
    if (seconds is None or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    active = [True]

    def alarm(signum, frame):
        if active[0]:
            raise TooSlow(f"no answer after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)
    try:
        yield
    finally:
        try:
            active[0] = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def memory_limit(extra_bytes: int | None):
    """Cap the address space at its current size plus ``extra_bytes`` (Linux), so a runaway
    allocation (a list of 10**12 layers) raises MemoryError in the case instead of the kernel
    killing the whole process; the previous soft limit comes back afterwards."""
    try:
        import resource
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        yield
        return
    if extra_bytes is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY and soft <= cap:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclass
class Outcome:
    kind: str                     # validated | refused | escaped
    stage: str = ""               # validate | build | params | time ("" for validate)
    exc: BaseException | None = None
    seconds: float = 0.0

    @property
    def signature(self) -> str:
        """The exception type and the project line that raised it (or the stage)."""
        if self.exc is None:
            return self.stage
        return f"{type(self.exc).__name__} at {raised_at(self.exc)} ({self.stage})"

    def message(self) -> str:
        if self.exc is None:
            return self.stage
        text = " ".join(str(self.exc).split())
        return f"{type(self.exc).__name__}: {text[:300]}"


def raised_at(exc: BaseException) -> str:
    """file:line (function) of the innermost frame in the project (composer/, blocks/), else
    the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if re.search(r"/(composer|blocks)/", f.filename)
            and "fuzz_recipes" not in f.filename]
    f = (mine or frames or [None])[-1]
    if f is None:
        return "?"
    try:
        rel = Path(f.filename).resolve().relative_to(ROOT)
    except ValueError:
        rel = Path(f.filename).name
    return f"{rel}:{f.lineno} ({f.name})"


META_BUILD_NODES = 4096
"""Graphs larger than this are not also built as a model: building costs some ms per sub-layer
even on the meta device (a 100,000-entry recipe takes minutes), while the graph's count is a sum
over nodes that smaller graphs of the same blocks already check."""


def check(make_recipe: Callable[[], Any], hard_limit: float | None = 60.0,
          slow: float | None = None, memory: int | None = 2 << 30) -> Outcome:
    """Run one case: ``make_recipe()`` validates (or refuses); a validated recipe's graph and
    meta-device model must agree on the parameter count (graphs up to
    :data:`META_BUILD_NODES` nodes; larger ones must answer in time). Never raises (but for
    KeyboardInterrupt): the outcome says what happened. ``hard_limit``: seconds after which
    the case is interrupted; ``slow``: seconds past which a case that answered anyway counts
    as escaped (stage ``time``); ``memory``: bytes of address space the case may add."""
    import torch

    t0 = time.perf_counter()
    try:
        with time_limit(hard_limit), memory_limit(memory):
            try:
                recipe = make_recipe()
            except HycompError as e:
                return _timed(Outcome("refused", exc=e), t0, slow)
            except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
                return Outcome("escaped", "validate", e, time.perf_counter() - t0)
            stage = "build"
            try:
                g = composer.layer_graph(recipe)
                graph_params = sum(int(a.get("params", 0)) for _, a in g.nodes(data=True))
                if g.number_of_nodes() > META_BUILD_NODES:
                    return _timed(Outcome("validated"), t0, slow)
                with torch.device("meta"):
                    model = composer.build_model(recipe)
                model_params = sum(p.numel() for p in model.parameters())
            except HycompError as e:      # refused by the build (a size limit): a user error
                return _timed(Outcome("refused", stage, e), t0, slow)
            except Exception as e:  # noqa: BLE001
                return Outcome("escaped", stage, e, time.perf_counter() - t0)
            if graph_params != model_params:
                err = Escape(f"layer graph counts {graph_params} parameters, the model built "
                             f"on the meta device has {model_params}")
                return Outcome("escaped", "params", err, time.perf_counter() - t0)
            return _timed(Outcome("validated"), t0, slow)
    except TooSlow as e:
        return Outcome("escaped", "time", e, time.perf_counter() - t0)


def _timed(out: Outcome, t0: float, slow: float | None) -> Outcome:
    out.seconds = time.perf_counter() - t0
    if slow is not None and out.seconds > slow:
        return Outcome("escaped", "time", TooSlow(f"{out.kind} after {out.seconds:.1f} s "
                                                  f"(limit {slow:g} s)"), out.seconds)
    return out


def check_dict(d: dict, **kw) -> Outcome:
    import copy
    return check(lambda: composer.validate_recipe(copy.deepcopy(d)), **kw)


def check_overrides(case: tuple[str, list[str]], **kw) -> Outcome:
    name, lines = case
    return check(lambda: composer.load_recipe(name, list(lines)), **kw)


def check_file(content: bytes, **kw) -> Outcome:
    return check(lambda: load_file(content), **kw)


def assert_property(out: Outcome, case: Any) -> None:
    """Raise the escaped exception (for Hypothesis to shrink and report), noting the case."""
    if out.kind != "escaped":
        return
    exc = out.exc if isinstance(out.exc, Exception) else Escape(out.message())
    if hasattr(exc, "add_note"):
        exc.add_note(f"hycomp property: {out.signature}; case: {reproduction(case)}")
    if exc is out.exc:
        raise exc
    raise exc from out.exc


def reproduction(case: Any) -> str:
    if isinstance(case, tuple):
        name, lines = case
        return f"composer.load_recipe({name!r}, {lines!r})"
    if isinstance(case, bytes):
        return f"recipe file bytes {case[:200]!r}"
    return f"composer.validate_recipe({case!r})"


STRATEGIES: dict[str, tuple[Callable[[], st.SearchStrategy], Callable[..., Outcome]]] = {
    "dicts": (recipe_dicts, check_dict),
    "overrides": (override_sets, check_overrides),
    "files": (recipe_files, check_file),
}


# --------------------------------------------------------------------------------------------
# The long run
# --------------------------------------------------------------------------------------------
@dataclass
class Tally:
    cases: int = 0
    validated: int = 0
    refused: int = 0
    escaped: int = 0
    refused_at_build: int = 0

    def add(self, out: Outcome) -> None:
        self.cases += 1
        setattr(self, out.kind, getattr(self, out.kind) + 1)
        if out.kind == "refused" and out.stage == "build":
            self.refused_at_build += 1

    def line(self, label: str) -> str:
        return (f"{label:<10} cases {self.cases:>6}  validated {self.validated:>6}  "
                f"refused {self.refused:>6} (by layer_graph {self.refused_at_build:>4})  "
                f"escaped {self.escaped:>5}")


class _Found(Exception):
    pass


def fuzz(names: list[str], examples: int | None, seconds: float | None, seed_: int,
         shrink: bool, show: int, case_seconds: float, round_size: int = 50) -> int:
    start = time.monotonic()
    tallies = {n: Tally() for n in names}
    escapes: dict[str, dict] = {}            # signature -> {count, message, repros, minimal}

    def budget_left() -> bool:
        total = sum(t.cases for t in tallies.values())
        if examples is not None and total >= examples:
            return False
        return seconds is None or time.monotonic() - start < seconds

    rnd = 0
    while budget_left():
        name = names[rnd % len(names)]
        make, checker = STRATEGIES[name]
        state: dict[str, Any] = {"target": None, "minimal": None, "shrink_t0": None}

        def body(case):
            if state["target"] is None and not budget_left():
                return
            if state["target"] is not None and time.monotonic() - state["shrink_t0"] > 120:
                return                        # shrinking too long: keep the best so far
            out = checker(case, hard_limit=max(3 * case_seconds, 20), slow=case_seconds)
            sig = out.signature
            if state["target"] is None:
                tallies[name].add(out)
                if out.kind != "escaped":
                    return
                e = escapes.setdefault(sig, {"count": 0, "message": out.message(),
                                             "repros": [], "minimal": None,
                                             "strategy": name})
                e["count"] += 1
                if len(e["repros"]) < show:
                    e["repros"].append(reproduction(case))
                if shrink and e["minimal"] is None:
                    state.update(target=sig, shrink_t0=time.monotonic())
            if out.kind == "escaped" and sig == state["target"]:
                state["minimal"] = (case, out)
                raise _Found(sig)             # one raise site: one failure for Hypothesis

        run = settings(database=None, deadline=None, max_examples=round_size,
                       suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                       phases=[Phase.generate, Phase.shrink] if shrink else [Phase.generate],
                       print_blob=False, verbosity=Verbosity.quiet)(
                           seed(seed_ * 100_003 + rnd)(given(make())(body)))
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                run()
        except Exception:  # noqa: BLE001 - _Found, or Hypothesis' report of it (flaky ...)
            if state["minimal"] is None:
                raise
            case, out = state["minimal"]
            escapes[state["target"]]["minimal"] = reproduction(case)
            escapes[state["target"]]["minimal_message"] = out.message()
        rnd += 1

    took = time.monotonic() - start
    total = Tally()
    print(f"fuzz_recipes: seed {seed_}, {took:.0f} s, strategies {', '.join(names)}")
    for n, t in tallies.items():
        print("  " + t.line(n))
        for k in ("cases", "validated", "refused", "escaped", "refused_at_build"):
            setattr(total, k, getattr(total, k) + getattr(t, k))
    print("  " + total.line("all"))
    if escapes:
        print(f"\n{len(escapes)} distinct escape(s):")
    for i, (sig, e) in enumerate(sorted(escapes.items(), key=lambda kv: -kv[1]["count"]), 1):
        print(f"\n[{i}] {sig}  -- {e['count']} case(s), strategy {e['strategy']}")
        print(f"    {e['message']}")
        if e.get("minimal"):
            print(f"    shrunk: {e['minimal']}")
            if e.get("minimal_message") and e["minimal_message"] != e["message"]:
                print(f"            {e['minimal_message']}")
        for r in e["repros"]:
            print(f"    e.g.    {r[:600]}")
    return 1 if escapes else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=None, help="stop after N cases in all")
    p.add_argument("--seconds", type=float, default=None, help="stop after S seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", choices=["all", *STRATEGIES], default="all")
    p.add_argument("--case-seconds", type=float, default=5.0,
                   help="a case answering later than this counts as escaped (default 5)")
    p.add_argument("--no-shrink", action="store_true",
                   help="do not shrink the first case of each new escape")
    p.add_argument("--show", type=int, default=3, help="reproductions printed per escape")
    a = p.parse_args(argv)
    if a.examples is None and a.seconds is None:
        a.examples = 500
    names = list(STRATEGIES) if a.strategy == "all" else [a.strategy]
    import warnings
    warnings.filterwarnings("ignore")
    from hypothesis.configuration import set_hypothesis_home_dir
    with tempfile.TemporaryDirectory(prefix="hycomp_fuzz_home_") as home:
        set_hypothesis_home_dir(home)          # leave no .hypothesis folder behind
        return fuzz(names, a.examples, a.seconds, a.seed, not a.no_shrink, a.show,
                    a.case_seconds)


if __name__ == "__main__":
    sys.exit(main())
