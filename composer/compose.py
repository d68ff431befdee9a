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

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from composer.errors import RecipeError
from composer.recipe import FORMS, Recipe, validate_recipe
from composer.registry import did_you_mean

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


def _source(name_or_path: str, overrides: list[str]) -> tuple[str, str, str, list[str]]:
    """(kind, where, config_name, extra overrides) for a name or a YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise RecipeError(what=f"recipe file not found: {name_or_path}",
                              why="no such file", fix="check the path")
        return "dir", str(p.resolve().parent), p.stem, [
            f"hydra.searchpath=[pkg://{RECIPES_MODULE}]"]
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
    overrides = list(overrides)
    parsed = parse_overrides(overrides)
    kind, where, name, extra = _source(name_or_path, overrides)
    GlobalHydra.instance().clear()
    init = (initialize_config_module(config_module=where, version_base=None) if kind == "module"
            else initialize_config_dir(config_dir=where, version_base=None))
    with init:
        try:
            cfg = compose(config_name=name, overrides=extra + overrides)
            base = compose(config_name=name, overrides=extra + _group_overrides(parsed))
        except MissingConfigException as e:
            raise _missing_config(e) from None
        except (HydraException, OmegaConfBaseException) as e:
            raise _composition_error(e, name, extra, parsed) from None
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
        base_data = OmegaConf.to_container(base, resolve=True)
    except OmegaConfBaseException as e:
        raise RecipeError(what="cannot resolve an interpolation", where=_key_of(e),
                          why=_clean(str(e).split("full_key")[0]),
                          fix="fix the ${...} expression") from None
    data.pop("hydra", None)
    _apply_form_rule(data, base_data, parsed)
    return data


def load_recipe(name_or_path: str = "config", overrides: Iterable[str] = ()) -> Recipe:
    """Compose and validate a recipe (see module docstring for what ``name_or_path`` may be)."""
    return validate_recipe(compose_dict(name_or_path, overrides))


def _group_overrides(parsed) -> list[str]:
    """Overrides that pick group options (``model=jamba_tiny``): they shape the base config."""
    groups = {q.name for q in recipes_dir().iterdir() if q.is_dir() and not q.name.startswith("_")}
    return [o.input_line for o in parsed
            if o.key_or_group in groups and not o.is_sweep_override()]


def _apply_form_rule(data: dict, base: dict, parsed) -> None:
    """A schedule form set on the command line replaces the recipe's form (module docstring)."""
    keys = {o.key_or_group for o in parsed if not o.is_delete()}
    chosen = [f for f in FORMS if f"model.schedule.{f}" in keys]
    if not chosen:
        return
    sched = data.get("model", {}).get("schedule")
    base_sched = (base.get("model") or {}).get("schedule") or {}
    if not isinstance(sched, dict):
        return
    base_form = [f for f in FORMS if base_sched.get(f) is not None]
    for f in FORMS:
        if f not in chosen:
            sched[f] = None
    lengthy = any(f in ("pattern", "layers", "segments") for f in chosen)
    if lengthy and base_form != chosen and "model.n_layers" not in keys:
        data["model"]["n_layers"] = None


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


def _composition_error(e: Exception, name: str, extra: list[str], parsed) -> RecipeError:
    msg = str(e)
    m = re.search(r"Could not (?:override|append to|delete from) '([^']+)'", msg)
    if m:
        key = m.group(1)
        parent, valid = _valid_siblings(name, extra, parsed, key)
        leaf = key.split(".")[len(parent.split(".")) if parent else 0]
        return RecipeError(
            what=f"unknown key '{leaf}' in override '{key}'",
            where=key,
            why=(f"{parent or 'the recipe'} has no key '{leaf}'"
                 + (f"; its keys are: {', '.join(valid)}" if valid else "")),
            fix=("fix the spelling" + did_you_mean(leaf, valid)
                 + f" (to add a new key on purpose, write +{key}=...)"))
    return RecipeError(what="cannot compose the recipe", why=_clean(msg),
                       fix="check the overrides and the recipe files")


def _valid_siblings(name, extra, parsed, key) -> tuple[str, list[str]]:
    """Deepest existing prefix of ``key`` in the base config, and the keys under it."""
    try:
        cfg = compose(config_name=name, overrides=extra + _group_overrides(parsed))
        node: Any = OmegaConf.to_container(cfg, resolve=False)
    except Exception:  # noqa: BLE001 - only for a better message
        return "", []
    parts, path = key.split("."), []
    for p in parts:
        if isinstance(node, dict) and p in node and isinstance(node[p], dict):
            node, path = node[p], path + [p]
        else:
            break
    return ".".join(path), sorted(k for k in (node or {}) if k != "hydra")


def _key_of(e: OmegaConfBaseException) -> str | None:
    return getattr(e, "full_key", None)
