"""Recipe problems: every error names its key path, the bad value, why, and a fix.

Validation collects problems rather than stopping at the first (:class:`Problems`) and raises
them as one :class:`RecipeError` (:func:`bundle`). :func:`pydantic_problems` renders Pydantic's
errors that way; :func:`schema_fields` says which keys a path allows, for did-you-mean hints.
"""
from __future__ import annotations

from typing import Any, get_args, get_origin

from pydantic import ValidationError

from composer.core.block import Spec
from composer.core.errors import RecipeError
from composer.core.registry import block_types, did_you_mean
from composer.recipe.schema import Recipe


class Problems:
    """The problems found so far; :meth:`raise_if_any` raises them together."""

    def __init__(self):
        self.items: list[RecipeError] = []

    def add(self, what, where, why, fix):
        self.items.append(RecipeError(what=what, where=where, why=why, fix=fix))

    def extend(self, errs):
        self.items.extend(errs)

    def raise_if_any(self):
        if self.items:
            raise bundle(self.items)


def bundle(probs: list[RecipeError]) -> RecipeError:
    if len(probs) == 1:
        return probs[0]
    return RecipeError(what=f"{len(probs)} problems in the recipe", problems=probs)


def schema_fields(path: list[str], base: dict) -> list[str] | None:
    """Keys the schema allows under ``path`` (None: any key, as under ``model.blocks``).

    Under ``model.blocks.<name>`` the fields are those of the block's spec, its kind read from
    ``base`` (a composed recipe dict; the name itself when absent)."""
    node: Any = Recipe
    for i, part in enumerate(path):
        if node is None:  # a free dict (blocks, symbols, kernels): any key
            if path[i - 1:i] == ["blocks"] and path[:1] == ["model"]:
                raw = ((base.get("model") or {}).get("blocks") or {}).get(part) or {}
                kind = raw.get("kind", part) if isinstance(raw, dict) else part
                bt = block_types().get(kind)
                node = bt.spec if bt else None
                if node is None:
                    return None
                continue
            return []
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            return []
        node = _model_in(fields[part].annotation)
        if node is None and not _is_dict(fields[part].annotation):
            return []
    if node is None:
        return None
    return list(getattr(node, "model_fields", {}))


def _is_dict(ann: Any) -> bool:
    return get_origin(ann) is dict


def _model_in(ann: Any):
    if isinstance(ann, type) and issubclass(ann, Spec):
        return ann
    for a in get_args(ann):
        m = _model_in(a)
        if m is not None:
            return m
    return None


def _loc_str(loc: tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def pydantic_problems(err: ValidationError, prefix: tuple = (),
                      fields_of=None) -> list[RecipeError]:
    """One :class:`RecipeError` per Pydantic error, with key path and a fix."""
    probs = []
    for e in err.errors():
        loc = prefix + tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
        where = _loc_str(loc)
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            key = loc[-1]
            valid = (fields_of(loc[:-1]) if fields_of else schema_fields(list(loc[:-1]), {})
                     or [])
            probs.append(RecipeError(
                what=f"unknown key '{key}'", where=where,
                why=f"{_loc_str(loc[:-1]) or 'the recipe'} has no field '{key}'"
                    + (f"; its fields are: {', '.join(valid)}" if valid else ""),
                fix=("remove it or fix the spelling" + did_you_mean(key, valid))))
        elif e["type"] == "union_tag_invalid":
            ctx = e.get("ctx") or {}
            tag, tags = ctx.get("tag"), [t.strip(" '") for t in
                                        str(ctx.get("expected_tags", "")).split(",")]
            field = str(ctx.get("discriminator", "")).removesuffix("()")
            key = "task" if field == "_data_kind" else "kind"
            probs.append(RecipeError(
                what=f"unknown {key} '{tag}'", where=f"{where}.{key}" if where else key,
                why=f"{key}s: {', '.join(tags)}",
                fix="use one of those" + did_you_mean(str(tag), tags)))
        elif e["type"] == "missing":
            probs.append(RecipeError(what=f"missing required key '{loc[-1]}'", where=where,
                                     why=e["msg"], fix=f"set {where}"))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            probs.append(RecipeError(what=f"bad value {short_repr(value)}", where=where, why=msg,
                                     fix=_fix_for(e)))
    return probs


def short_repr(v: Any) -> str:
    """``repr(v)``, cut to 80 characters for an error message."""
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _fix_for(e: dict) -> str:
    ctx = e.get("ctx") or {}
    t = e["type"]
    if t == "literal_error":
        return f"use one of {ctx.get('expected')}"
    if t in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        return "use a value " + e["msg"].lower().removeprefix("input should be ")
    if t.endswith("_parsing") or t.endswith("_type"):
        return "give a value of that type"
    return "change the value as the reason says"
