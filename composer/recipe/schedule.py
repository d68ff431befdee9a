"""Schedule expansion: ratio | pattern | explicit list | segments -> one entry per sub-layer.

Two ways of counting layers are both expressible (README, "Counting layers"):

* HF counting: the schedule names mixers only and ``model.ffn`` is set; each schedule entry is a
  layer of two residual sub-layers, mixer then FFN (Jamba, Gemma, Qwen3-Next, Samba).
* Megatron counting: the schedule places FFN blocks itself (``-``/``E`` in a pattern, or an FFN
  block in a list or ratio), or ``model.ffn`` is null; one residual sub-layer per entry
  (Nemotron-H's ``M-M-M*-``).

Everything here is a pure function of the recipe's ``model`` section; :func:`expand_schedule`
also resolves and validates every block spec, collecting problems rather than stopping at the
first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from composer.core.block import BlockSpec
from composer.core.registry import block_types, default_symbols, did_you_mean
from composer.recipe.placement import place_even, place_period, repeat_to
from composer.recipe.problems import Problems, pydantic_problems
from composer.recipe.schema import MAX_DEPTH

# Megatron-LM's pattern symbols, reserved even before their block types are registered.
MEGATRON_SYMBOLS = {"M": "mamba2", "*": "attention", "-": "mlp", "E": "moe", "G": "gated_deltanet"}


@dataclass(frozen=True)
class Entry:
    """One residual sub-layer.

    index: position among sub-layers; layer: HF-style layer it belongs to; name: block name in
    the recipe; kind: registered block type; module_key: sub-layers with the same key share one
    module (weights); entry: index in the schedule before FFNs were added.
    """

    index: int
    layer: int
    entry: int
    name: str
    kind: str
    role: str
    spec: BlockSpec
    module_key: str


@dataclass
class Expanded:
    entries: list[Entry]
    counting: str  # "hf" | "megatron"
    pattern: str   # one symbol per sub-layer
    names: list[str] = field(default_factory=list)  # schedule entries before FFNs

    def __len__(self) -> int:
        return len(self.entries)


def symbol_table(model) -> dict[str, str]:
    """Pattern symbol -> block name: Megatron's, then registered blocks', then the recipe's."""
    table = dict(MEGATRON_SYMBOLS)
    table.update(default_symbols())
    table.update(model.symbols)
    return table


def _check_symbols(model, probs: Problems) -> None:
    """``model.symbols``: one character each, not a separator, not a built-in symbol taken
    for another block (that would silently change every pattern using it), naming a block."""
    builtin = {**MEGATRON_SYMBOLS, **default_symbols()}
    known = set(block_types()) | set(model.blocks)
    free = [c for c in "ACFHIJKNOQSTUVZabcdefhijklnopqstuvwxyz0123456789" if c not in builtin
            and c not in model.symbols][:8]
    for sym, name in model.symbols.items():
        where = f"model.symbols.{sym}"
        if len(sym) != 1 or sym in "| \t":
            probs.add(f"bad pattern symbol {sym!r}", where,
                      "a symbol is one character, one per schedule entry ('|' and spaces "
                      "separate)", f"use one character, e.g. model.symbols.{free[0]}={name}")
        elif sym in builtin and builtin[sym] != name:
            probs.add(f"symbol '{sym}' is already '{builtin[sym]}'", where,
                      f"'{sym}' is the built-in symbol of {builtin[sym]}; mapping it to "
                      f"'{name}' would change what every pattern with '{sym}' builds",
                      f"pick an unused symbol: {', '.join(free)}")
        if name not in known:
            probs.add(f"symbol '{sym}' names unknown block '{name}'", where,
                      "a symbol maps to a registered block type or a name under model.blocks",
                      "use one of: " + ", ".join(sorted(known)) + did_you_mean(name, known))


# --------------------------------------------------------------------------------------------
def _resolve_specs(model, used: set[str], probs: Problems) -> dict[str, BlockSpec]:
    """Validate ``model.blocks`` and give every used block name its spec."""
    types = block_types()
    specs: dict[str, BlockSpec] = {}
    names = set(model.blocks) | used
    for name in sorted(names):
        raw = dict(model.blocks.get(name) or {})
        kind = raw.get("kind", name)
        where = f"model.blocks.{name}" + (".kind" if "kind" in raw else "")
        if kind not in types:
            known = sorted(set(types) | set(model.blocks))
            if name in model.blocks:
                probs.add(f"unknown block type '{kind}'", where,
                          f"registered block types: {', '.join(sorted(types))}",
                          "set kind to a registered type" + did_you_mean(kind, types))
            else:
                probs.add(f"unknown block name '{name}'", _where_used(model, name),
                          f"it is neither a registered block type ({', '.join(sorted(types))}) "
                          f"nor a name under model.blocks", "use one of: " + ", ".join(known)
                          + did_you_mean(name, known))
            continue
        raw["kind"] = kind
        bt = types[kind]
        try:
            spec = bt.spec.model_validate(raw)
        except ValidationError as err:
            probs.extend(pydantic_problems(err, ("model", "blocks", name),
                                           fields_of=lambda loc, s=bt.spec: list(s.model_fields)))
            continue
        for fld, value, why, fix in spec.problems(model.d_model, model.max_seq_len):
            probs.add(f"bad value {value!r}", f"model.blocks.{name}.{fld}", why, fix)
        specs[name] = spec
    return specs


def _where_used(model, name: str) -> str:
    s = model.schedule
    if s.layers and name in s.layers:
        return f"model.schedule.layers[{s.layers.index(name)}]"
    if s.blocks and name in s.blocks:
        return f"model.schedule.blocks[{s.blocks.index(name)}]"
    if model.ffn == name:
        return "model.ffn"
    for sym, n in model.symbols.items():
        if n == name:
            return f"model.symbols.{sym}"
    return "model.schedule"


def _expand_form(form_cfg, depth: int | None, symbols: dict[str, str], where: str,
                 probs: Problems) -> list[str]:
    """Names for one schedule form (a whole schedule or one segment)."""
    given = [f for f in ("ratio", "pattern", "layers") if getattr(form_cfg, f) is not None]
    if len(given) != 1:
        if not given:
            probs.add("no schedule", where, "set one of ratio (with blocks), pattern, layers"
                      + ("" if where.endswith("]") else ", segments"),
                      f"e.g. {where}.ratio='3:1' {where}.blocks=[mamba2,attention]")
        else:
            probs.add(f"{' and '.join(given)} are all set", where,
                      "a schedule has exactly one form",
                      f"keep one of {', '.join(given)} (on the command line, setting one form "
                      "replaces the recipe's)")
        return []
    form = given[0]
    if form == "ratio":
        return _ratio_names(form_cfg, depth, where, probs)
    if form == "pattern":
        return _pattern_names(form_cfg.pattern, depth, symbols, where, probs)
    names = list(form_cfg.layers)
    if not names:
        probs.add("empty layer list", f"{where}.layers", "the list needs at least one entry",
                  "list a block name per entry")
        return []
    return _to_depth(names, depth, f"{where}.layers", "list", probs, repeat=False)


def _ratio_names(form_cfg, depth: int | None, where: str, probs: Problems) -> list[str]:
    """A ratio over block names laid out by its placement (``even`` or ``period``)."""
    text = form_cfg.ratio
    if not re.fullmatch(r"\s*\d+(\s*:\s*\d+)*\s*", text):
        probs.add(f"bad ratio '{text}'", f"{where}.ratio",
                  "ratio parts are non-negative integers separated by ':'",
                  "write it like '3:1' or '2:1:1'")
        return []
    parts = [int(p) for p in text.split(":")]
    if sum(parts) <= 0:
        probs.add(f"bad ratio '{text}'", f"{where}.ratio", "the parts sum to zero",
                  "give at least one positive part")
        return []
    names = form_cfg.blocks
    if not names:
        probs.add("ratio without blocks", f"{where}.blocks",
                  "a ratio needs the block names its parts refer to",
                  f"set {where}.blocks=[mamba2,attention] (one name per part)")
        return []
    if len(names) != len(parts):
        probs.add(f"{len(parts)} ratio parts for {len(names)} blocks", f"{where}.ratio",
                  f"ratio '{text}' has {len(parts)} parts but blocks {names} has "
                  f"{len(names)} names", "give one part per block name")
        return []
    if depth is None:
        probs.add("ratio without depth", where.rsplit(".schedule", 1)[0] + ".n_layers"
                  if ".schedule" in where else f"{where}.n_layers",
                  "a ratio says how to mix blocks, not how many layers",
                  "set model.n_layers")
        return []
    if form_cfg.placement == "even":
        return place_even(names, parts, depth)
    if form_cfg.offset is not None and form_cfg.offset >= sum(parts):
        probs.add(f"offset {form_cfg.offset} outside the unit", f"{where}.offset",
                  f"the repeating unit of ratio '{text}' has {sum(parts)} layers",
                  f"use an offset below {sum(parts)}")
        return []
    return place_period(names, parts, depth, form_cfg.offset)


def _pattern_names(pattern: str, depth: int | None, symbols: dict[str, str], where: str,
                   probs: Problems) -> list[str]:
    """One block name per pattern symbol; a shorter pattern repeats to the depth."""
    text = pattern.replace("|", "").replace(" ", "")
    if not text:
        probs.add("empty pattern", f"{where}.pattern", "a pattern needs one symbol per entry",
                  "e.g. 'M-M-M*-'")
        return []
    bad = [(i, c) for i, c in enumerate(text) if c not in symbols]
    if bad:
        i, c = bad[0]
        known = ", ".join(f"{s} ({n})" for s, n in symbols.items())
        probs.add(f"unknown pattern symbol '{c}' at position {i}", f"{where}.pattern",
                  f"known symbols: {known}",
                  f"use a known symbol, or map it: model.symbols.{c}=<block name>")
        return []
    names = [symbols[c] for c in text]
    return _to_depth(names, depth, f"{where}.pattern", "pattern", probs, repeat=True)


def _to_depth(names, depth, where, what, probs, repeat):
    if depth is None or depth == len(names):
        return names
    if repeat and len(names) < depth:
        return repeat_to(names, depth)
    probs.add(f"{what} length {len(names)} does not match the depth {depth}", where,
              f"model.n_layers is {depth}" + (" (a shorter pattern repeats; a longer one is "
                                              "an error)" if repeat else ""),
              f"give {depth} entries, or set model.n_layers={len(names)} "
              "(or null to use the length)")
    return []


def _select(sel, entries: list[str], where: str, probs: Problems) -> list[int]:
    n = len(entries)
    chosen = set(range(n))
    if sel.indices is not None:
        idx = set()
        for i in sel.indices:
            if not -n <= i < n:
                probs.add(f"index {i} out of range", f"{where}.indices",
                          f"the schedule has {n} entries", f"use indices in [-{n}, {n - 1}]")
                return []
            idx.add(i % n)
        chosen &= idx
    if sel.every is not None:
        chosen &= {i for i in range(n) if i >= sel.offset and (i - sel.offset) % sel.every == 0}
    if sel.first is not None:
        chosen &= set(range(min(sel.first, n)))
    if sel.last is not None:
        chosen &= set(range(max(0, n - sel.last), n))
    if sel.block is not None:
        if sel.block not in entries:
            probs.add(f"override selects block '{sel.block}', which is not in the schedule",
                      f"{where}.block", f"the schedule places: {', '.join(sorted(set(entries)))}",
                      "fix the name" + did_you_mean(sel.block, set(entries)))
        chosen &= {i for i in range(n) if entries[i] == sel.block}
    # an empty selection is fine otherwise: "every 6th from 5" selects nothing in 4 layers
    return sorted(chosen)


@dataclass
class _Expansion:
    """What :func:`expand_schedule` knows after each of its steps."""

    model: Any
    probs: Problems
    names: list[str] = field(default_factory=list)        # block name per schedule entry
    entry_over: dict[int, dict[str, Any]] = field(default_factory=dict)  # entry -> fields
    ffn_over: dict[int, str] = field(default_factory=dict)               # entry -> FFN name
    specs: dict[str, BlockSpec] = field(default_factory=dict)            # name -> spec
    megatron: bool = False                                 # FFNs placed by the schedule
    entries: list[Entry] = field(default_factory=list)


def expand_schedule(model, probs: Problems) -> Expanded:
    """Resolve every block spec of ``model`` and expand its schedule into sub-layers.

    Problems go to ``probs``, which is raised after the specs are resolved and again at the
    end (a schedule with unresolved blocks cannot be laid out). Sets ``model._specs``.
    """
    x = _Expansion(model, probs)
    _names(x)
    _apply_overrides(x)
    _resolve_used(x)
    probs.raise_if_any()
    model._specs = x.specs
    _counting(x)
    _entries(x)
    probs.raise_if_any()
    return Expanded(x.entries, "megatron" if x.megatron else "hf", _pattern(x), x.names)


def _names(x: _Expansion) -> None:
    """Step 1: one block name per schedule entry, from the schedule form or its segments."""
    model, probs, sch = x.model, x.probs, x.model.schedule
    _check_symbols(model, probs)
    symbols = symbol_table(model)
    if sch.segments is None:
        x.names = _expand_form(sch, model.n_layers, symbols, "model.schedule", probs)
        return
    others = [f for f in ("ratio", "pattern", "layers") if getattr(sch, f) is not None]
    if others:
        probs.add(f"segments and {', '.join(others)} are both set", "model.schedule",
                  "a schedule has exactly one form",
                  f"move {', '.join(others)} into a segment, or drop segments")
        return
    total = sum(s.n_layers for s in sch.segments)
    if total > MAX_DEPTH:
        probs.add(f"segments cover {total:,} entries", "model.schedule.segments",
                  f"a recipe has at most {MAX_DEPTH:,} schedule entries",
                  "shorten the segments")
        return
    for k, seg in enumerate(sch.segments):
        x.names += _expand_form(seg, seg.n_layers, symbols, f"model.schedule.segments[{k}]",
                                probs)
    if model.n_layers is not None and model.n_layers != total and not probs.items:
        probs.add(f"segments cover {total} entries, model.n_layers is {model.n_layers}",
                  "model.schedule.segments", "the segment lengths must add up to the depth",
                  f"set model.n_layers={total} (or null)")


def _apply_overrides(x: _Expansion) -> None:
    """Step 2: per-layer overrides; block swaps first (they change which spec an entry gets)."""
    for k, ov in enumerate(x.model.schedule.overrides if x.names else []):
        where = f"model.schedule.overrides[{k}]"
        for i in _select(ov.select, x.names, f"{where}.select", x.probs):
            if ov.block is not None:
                x.names[i] = ov.block
            if ov.set:
                x.entry_over.setdefault(i, {}).update(ov.set)
            if ov.ffn is not None:
                x.ffn_over[i] = ov.ffn


def _resolve_used(x: _Expansion) -> None:
    """Step 3: the spec of every name in use; composite blocks pull in their branches."""
    model = x.model
    used = set(x.names) | set(x.ffn_over.values()) | ({model.ffn} if model.ffn else set())
    used |= set(model.shared)
    x.specs = _resolve_specs(model, used, x.probs)
    types = block_types()
    for name, spec in sorted(x.specs.items()):
        if types[spec.kind].role != "composite":
            continue
        for j, b in enumerate(spec.branches):
            if b not in x.specs:
                x.specs.update(_resolve_specs(model, {b}, x.probs))
            if b in x.specs and types[x.specs[b].kind].role == "composite":
                x.probs.add(f"composite block '{b}' as a branch of '{name}'",
                            f"model.blocks.{name}.branches[{j}]",
                            f"'{b}' is a {x.specs[b].kind} block: a branch runs one block "
                            "on the sub-layer's input, and composite blocks do not nest",
                            f"list the branches of '{b}' ({', '.join(x.specs[b].branches)}) "
                            f"in '{name}' itself, or use a non-composite block")


def _counting(x: _Expansion) -> None:
    """Step 4: HF counting (mixer + FFN per entry) unless the schedule places FFNs itself."""
    model, probs, specs = x.model, x.probs, x.specs
    types = block_types()
    roles = [types[specs[n].kind].role for n in x.names]
    x.megatron = model.ffn is None or "ffn" in roles
    if not x.megatron:
        for fname in sorted({model.ffn} | set(x.ffn_over.values())):
            role = types[specs[fname].kind].role
            if role != "ffn":
                probs.add(f"'{fname}' is not an FFN block", "model.ffn" if fname == model.ffn
                          else "model.schedule.overrides", f"'{fname}' is a {role}",
                          "name an FFN block (mlp, moe, ...)")
    elif x.ffn_over:
        probs.add("override sets ffn in a schedule that places FFN blocks itself",
                  "model.schedule.overrides", "with Megatron counting every FFN is an entry",
                  "swap the FFN entries with `block:` instead")
    for name in model.shared:
        if name not in x.names:
            probs.add(f"shared block '{name}' is never placed", "model.shared",
                      "a shared block must appear in the schedule", "place it or remove it")


def _entries(x: _Expansion) -> None:
    """Step 5: the sub-layers, per-entry field overrides applied, FFNs added (HF counting)."""
    model, probs, specs, entries = x.model, x.probs, x.specs, x.entries
    types = block_types()
    shared_specs: dict[str, tuple[int, BlockSpec]] = {}
    for i, name in enumerate(x.names):
        spec = specs[name]
        if i in x.entry_over:
            spec = _with_fields(spec, x.entry_over[i], i, model.schedule.overrides, probs, model)
            if spec is None:
                continue
        key = f"shared.{name}" if name in model.shared else f"layers.{len(entries)}"
        if name in model.shared:
            first = shared_specs.setdefault(name, (i, spec))
            if first[1] != spec:
                probs.add(f"shared block '{name}' differs between entries {first[0]} and {i}",
                          "model.schedule.overrides", "every placement of a shared block is "
                          "one module, so its settings cannot differ",
                          "override a non-shared copy (a new name with the same kind)")
        entries.append(Entry(len(entries), i, i, name, spec.kind, types[spec.kind].role, spec,
                             key))
        if not x.megatron:
            fname = x.ffn_over.get(i, model.ffn)
            fspec = specs[fname]
            fkey = f"shared.{fname}" if fname in model.shared else f"layers.{len(entries)}"
            entries.append(Entry(len(entries), i, i, fname, fspec.kind, "ffn", fspec, fkey))


def _pattern(x: _Expansion) -> str:
    """One symbol per sub-layer: the recipe's own symbols first, then the registered ones."""
    types = block_types()
    rev = {n: s for s, n in symbol_table(x.model).items()}
    return "".join(rev.get(e.name) or types[e.kind].symbol or "?" for e in x.entries)


def _with_fields(spec, fields, i, overrides, probs, model):
    k = next(k for k, ov in enumerate(overrides) if ov.set and set(ov.set) & set(fields))
    try:
        new = type(spec).model_validate({**spec.model_dump(), **fields})
    except ValidationError as err:
        for p in pydantic_problems(err, ("model", "schedule", "overrides", k, "set"),
                                   fields_of=lambda loc: list(type(spec).model_fields)):
            p.why = f"{p.why} (entry {i} is a {spec.kind} block)"
            probs.items.append(p)
        return None
    for fld, value, why, fix in new.problems(model.d_model, model.max_seq_len):
        probs.add(f"bad value {value!r} at entry {i}",
                  f"model.schedule.overrides[{k}].set.{fld}", why, fix)
    return new
