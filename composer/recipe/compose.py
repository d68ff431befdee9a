"""Recipe loading: Hydra composition of the packaged config tree, then Pydantic validation.

``load_recipe(name_or_path, overrides)`` accepts

* a primary config name in the packaged tree (``config``, the default),
* a model recipe name (``jamba_tiny`` means ``config`` with ``model=jamba_tiny``),
* a path to a YAML file of your own (it may use ``defaults:`` to start from packaged groups).

Command-line rule for schedules: setting one schedule form (``model.schedule.pattern=...``)
replaces the recipe's form; when that form has a length of its own (pattern, layers, segments)
and ``model.n_layers`` is not given too, the depth comes from it.

Every failure raises :class:`RecipeError` (what, where, why, fix); nothing here runs code from
the recipe: YAML is read safely and nothing is instantiated from ``_target_`` keys.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from composer.core.errors import RecipeError
from composer.recipe.files import root_config
from composer.recipe.problems import schema_fields
from composer.recipe.schema import FORMS, Recipe
from composer.recipe.validate import validate_recipe
from composer.core.registry import did_you_mean

RECIPES_MODULE = "recipes"


def recipes_dir() -> Path:
    import recipes
    return Path(recipes.__file__).resolve().parent


def group_options(group: str) -> list[str]:
    """Names of the packaged options of a config group (``model``, ``data``, ``train``)."""
    return sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml"))


def parse_overrides(overrides: Iterable[str]):
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as e:
        raise RecipeError(what="cannot parse an override", where=_first_line(str(e)),
                          why=_clean(str(e)),
                          fix="write overrides as key=value (quote values with spaces or "
                              "special characters)") from None


def _clean(msg: str) -> str:
    return " ".join(msg.split())


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else ""


def _source(name_or_path: str) -> tuple[str, str, str, list[str]]:
    """(kind, where, config_name, extra overrides) for a name or a YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        if p.is_dir() and (p / "recipe.json").is_file():
            p = p / "recipe.json"  # a checkpoint folder
        if not p.is_file():
            raise RecipeError(what=f"recipe file not found: {name_or_path}",
                              why="no such file", fix="check the path")
        try:
            return root_config(p, recipes_dir())
        except yaml.YAMLError as e:
            raise _yaml_error(e) from None
        except OSError as e:
            raise RecipeError(what=f"cannot read the recipe file {name_or_path}",
                              why=e.strerror or str(e), fix="check the path and its "
                              "permissions") from None
    primaries = sorted(q.stem for q in recipes_dir().glob("*.yaml"))
    if name_or_path in primaries:
        return "module", RECIPES_MODULE, name_or_path, []
    models = group_options("model")
    if name_or_path in models:
        return "module", RECIPES_MODULE, "config", [f"model={name_or_path}"]
    raise RecipeError(what=f"unknown recipe '{name_or_path}'",
                      why=f"it is not a YAML file, a root config ({', '.join(primaries)}) or a "
                          f"model recipe ({', '.join(models)})",
                      fix="give a path to a .yaml file or one of those names"
                          + did_you_mean(name_or_path, primaries + models))


def compose_dict(name_or_path: str = "config", overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The composed, resolved config as a plain dict (before validation)."""
    cfg = _compose(name_or_path, list(overrides))
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise RecipeError(what="cannot resolve an interpolation", where=_key_of(e),
                          why=_clean(str(e).split("full_key")[0]),
                          fix="fix the ${...} expression") from None
    data.pop("hydra", None)
    return data


def full_overrides(name_or_path: str, overrides: Iterable[str]) -> list[str]:
    """``overrides`` plus those the schedule-form rule adds (module docstring)."""
    overrides = list(overrides)
    parsed = parse_overrides(overrides)
    _, base = _base(name_or_path, parsed)
    return _expand(overrides, parsed, base)


def _base(name_or_path: str, parsed) -> tuple[tuple, dict]:
    """The source of a recipe and its config with only the group choices applied."""
    src = _source(name_or_path)
    kind, where, name, extra = src
    cfg = _compose_in(kind, where, name, extra + _group_overrides(parsed), {})
    return src, OmegaConf.to_container(cfg, resolve=False)


def _expand(overrides: list[str], parsed, base: dict) -> list[str]:
    """Schema-known keys absent from the YAML become appends; the form rule adds its nulls."""
    return [_append_if_schema_allows(o, base) for o in overrides] + _form_rule(base, parsed)


def _append_if_schema_allows(line: str, base: dict) -> str:
    """``key=v`` -> ``+key=v`` when the schema knows ``key`` but the recipe file omits it.

    Hydra only accepts overrides of keys present in the composed YAML; the schema, not the
    YAML, decides which keys exist, so any block field can be set from the command line.
    """
    o = parse_overrides([line])[0]
    if o.is_add() or o.is_delete() or o.is_force_add() or o.package or "." not in o.key_or_group:
        return line
    path = o.key_or_group.split(".")
    node: Any = base
    for part in path[:-1]:
        if not isinstance(node, dict) or part not in node:
            node = None
            break
        node = node[part]
    if isinstance(node, dict) and path[-1] in node:
        return line
    if node is None and _prefix_is_free(path, base):
        # a block the recipe file does not list: add it whatever the field, so validation
        # names a wrong field against the block's spec (Hydra would blame the block's name)
        return "+" + line
    allowed = schema_fields(path[:-1], base)
    if isinstance(node, dict) and (allowed is None or path[-1] in allowed):
        return "+" + line
    return line


def _prefix_is_free(path: list[str], base: dict) -> bool:
    """True when the missing parents of ``path`` sit under a free dict (a new block name)."""
    return path[:2] == ["model", "blocks"] and len(path) >= 4


def _init(kind: str, where: str):
    GlobalHydra.instance().clear()
    return (initialize_config_module(config_module=where, version_base=None) if kind == "module"
            else initialize_config_dir(config_dir=where, version_base=None))


def _compose_in(kind: str, where: str, name: str, overrides: list[str], base: dict):
    """Hydra's compose, every failure turned into a :class:`RecipeError` (``base``: the
    recipe before value overrides, for did-you-mean on unknown keys)."""
    with _init(kind, where):
        try:
            return compose(config_name=name, overrides=overrides)
        except MissingConfigException as e:
            raise _missing_config(e) from None
        except yaml.YAMLError as e:
            raise _yaml_error(e) from None
        except (HydraException, OmegaConfBaseException) as e:
            raise _composition_error(e, base) from None
        except ValueError as e:  # Hydra's defaults list / group-override checks
            raise RecipeError(what="cannot compose the recipe", why=_clean(str(e)),
                              fix="a config group takes a name (model=jamba_tiny) and a "
                                  "defaults list is a list of names; check the overrides "
                                  "and the recipe file") from None


def _compose(name_or_path: str, overrides: list[str]):
    parsed = parse_overrides(overrides)
    (kind, where, name, extra), base = _base(name_or_path, parsed)
    return _compose_in(kind, where, name, extra + _expand(overrides, parsed, base), base)


def load_recipe(name_or_path: str = "config", overrides: Iterable[str] = ()) -> Recipe:
    """Compose and validate a recipe (see module docstring for what ``name_or_path`` may be)."""
    return validate_recipe(compose_dict(name_or_path, overrides))


def _group_overrides(parsed) -> list[str]:
    """Overrides that pick group options (``model=jamba_tiny``): they shape the base config."""
    groups = {q.name for q in recipes_dir().iterdir() if q.is_dir() and not q.name.startswith("_")}
    return [o.input_line for o in parsed
            if o.key_or_group in groups and not o.is_sweep_override()]


def _form_rule(base: dict, parsed) -> list[str]:
    """Overrides that let a schedule form set on the command line replace the recipe's."""
    keys = {o.key_or_group for o in parsed}
    chosen = [f for f in FORMS if f"model.schedule.{f}" in keys]
    sched = ((base.get("model") or {}).get("schedule")) if isinstance(base, dict) else None
    if not chosen or not isinstance(sched, dict):
        return []
    base_form = [f for f in FORMS if sched.get(f) is not None]
    out = [f"model.schedule.{f}=null" for f in FORMS if f not in chosen and f in sched
           and sched.get(f) is not None]
    lengthy = any(f in ("pattern", "layers", "segments") for f in chosen)
    if lengthy and base_form != chosen and "model.n_layers" not in keys:
        out.append("model.n_layers=null")
    return out


def depth_change(name_or_path: str, overrides: Iterable[str]) -> tuple[int, str, str] | None:
    """(the recipe's n_layers, the form chosen, the recipe's form) when the schedule-form rule
    drops the recipe's ``n_layers`` (module docstring); None otherwise."""
    parsed = parse_overrides(list(overrides))
    _, base = _base(name_or_path, parsed)
    if "model.n_layers=null" not in _form_rule(base, parsed):
        return None
    model = base.get("model") or {}
    keys = {o.key_or_group for o in parsed}
    chosen = [f for f in FORMS if f"model.schedule.{f}" in keys]
    before = [f for f in FORMS if (model.get("schedule") or {}).get(f) is not None]
    if not isinstance(model.get("n_layers"), int):
        return None
    return model["n_layers"], chosen[0], before[0] if before else "schedule"


def _yaml_error(e: yaml.YAMLError) -> RecipeError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark else None
    tag = "python/" in str(e)
    return RecipeError(what="cannot read the recipe YAML", where=where,
                       why=(" ".join(str(getattr(e, "problem", None) or e).split())
                            + (" (recipes are data: Python object tags are not allowed)"
                               if tag else "")),
                       fix="fix the YAML at that line" + (" and remove the !!python tag"
                                                          if tag else ""))


def _missing_config(e: MissingConfigException) -> RecipeError:
    msg = str(e)
    m = re.search(r"Could not find '([^']+)'", msg)
    missing = m.group(1) if m else msg
    group, _, option = missing.rpartition("/")
    options = group_options(group) if group else []
    return RecipeError(what=f"unknown {group or 'config'} recipe '{option}'",
                       where=f"{group}={option}" if group else None,
                       why=(f"the packaged {group} recipes are: {', '.join(options)}"
                            if options else _clean(msg)),
                       fix=("pick one of those" + did_you_mean(option, options)
                            if options else "check the name"))


def _composition_error(e: Exception, base: dict) -> RecipeError:
    msg = str(e)
    m = re.search(r"Could not (?:override|append to|delete from) '([^']+)'", msg)
    if not m:
        return RecipeError(what="cannot compose the recipe", why=_clean(msg),
                           fix="check the overrides and the recipe files")
    key = m.group(1)
    parts, path, node = key.split("."), [], base
    for p in parts[:-1]:  # deepest prefix of the key that exists
        if not (isinstance(node, dict) and isinstance(node.get(p), dict)):
            break
        node, path = node[p], path + [p]
    valid = set(k for k in (node if isinstance(node, dict) else {}) if k != "hydra")
    valid |= set(schema_fields(path, base) or [])
    valid = sorted(valid)
    parent, leaf = ".".join(path), parts[len(path)]
    if leaf in valid:  # a key the schema knows, absent from the recipe files
        return RecipeError(
            what=f"cannot set '{key}': the recipe has no '{leaf}' section to set it in",
            where=key, why=f"'{leaf}' is a valid key, but the composed recipe does not "
                           f"contain it, and Hydra overrides only keys that exist",
            fix=f"add '{leaf}:' to the recipe file, or write the override as +{key}=...")
    return RecipeError(
        what=f"unknown key '{leaf}' in override '{key}'", where=key,
        why=(f"{parent or 'the recipe'} has no key '{leaf}'"
             + (f"; its keys are: {', '.join(valid)}" if valid else "")),
        fix="fix the spelling" + did_you_mean(leaf, valid))


def _key_of(e: OmegaConfBaseException) -> str | None:
    return getattr(e, "full_key", None)
