"""Recipe files of your own (``-r FILE``): read, classify, and turn into a root config Hydra
composes.

Three kinds of file are accepted (docs/recipes.md, "Recipe files and the config tree"):

* a **root config** (``.yaml``): sections ``model:``, ``data:``, ``train:``, ``kernels:``. Without
  a ``defaults:`` list it starts from the packaged root config (``model: hybrid_small``,
  ``data: pystdlib``, ``train: cpu``) and changes what it writes; with one, the list is taken as
  written. Either way the packaged ``kernels`` and ``hydra`` settings (run folders under
  ``runs/``) apply wherever the file does not set them.
* a **model recipe** (``.yaml`` whose keys are all fields of ``model``, as a copy of
  ``recipes/model/*.yaml``): taken as the ``model`` section, exactly as ``model=NAME`` takes a
  packaged one; data and train are the packaged defaults.
* a **full recipe** (``.json``, as a checkpoint's ``recipe.json``): every section as written,
  no packaged groups merged in (only the ``hydra`` settings).

The file is read here (UTF-8 text, a YAML or JSON mapping, safe loader: Python tags refused),
and the root config to compose is written to a private temporary folder; the file's own folder
stays on Hydra's search path, so config groups next to it still resolve.
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf._utils import get_yaml_loader

from composer.core.errors import RecipeError
from composer.recipe.problems import short_repr

SECTIONS = ("model", "data", "train", "kernels")
_TMP: list[str] = []


def _tmpdir() -> Path:
    if not _TMP:
        _TMP.append(tempfile.mkdtemp(prefix="hycomp-recipe-"))
        atexit.register(shutil.rmtree, _TMP[0], True)
    return Path(_TMP[0])


SECTIONS = ("model", "data", "train", "kernels")
"""The sections of a recipe (:class:`composer.recipe.schema.Recipe`); each is a mapping."""


def read_file(path: Path) -> dict[str, Any]:
    """The mapping in a recipe file, or a :class:`RecipeError` saying why there is none."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text = None
        why = f"byte {e.start} is not UTF-8 ({raw[e.start:e.start + 1]!r})"
    if text is not None and "\x00" in text:
        text, why = None, "it contains NUL bytes"
    if text is None:
        raise RecipeError(what=f"{path} is not a recipe file", where=str(path),
                          why=f"a recipe is YAML or JSON text; this looks binary: {why}",
                          fix="give a .yaml (or a checkpoint's recipe.json) file")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(what="cannot read the recipe JSON",
                              where=f"{path}:{e.lineno}:{e.colno}", why=e.msg,
                              fix="fix the JSON at that line") from None
    else:
        with path.open(encoding="utf-8") as f:  # the stream's name goes into error marks
            data = yaml.load(f, Loader=get_yaml_loader())  # a SafeLoader: no Python tags
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(what=f"{path} is not a recipe", where=str(path),
                          why=f"a recipe file holds a mapping of sections (model:, data:, "
                              f"train:, kernels:), this one a {type(data).__name__}",
                          fix="see docs/recipes.md, 'Recipe files and the config tree'")
    if "defaults" in data and not isinstance(data["defaults"], list):
        raise RecipeError(what="bad defaults list", where=f"{path}: defaults",
                          why=f"defaults is a list of config names, got "
                              f"{type(data['defaults']).__name__} {data['defaults']!r}",
                          fix="write it as a list, e.g. defaults: [config, _self_]")
    for section in SECTIONS:
        value = data.get(section)
        if value is not None and not isinstance(value, dict):
            raise RecipeError(what=f"section '{section}' is not a mapping",
                              where=f"{path}: {section}",
                              why=f"'{section}:' holds its keys (e.g. {section}.<key>: value), "
                                  f"this one a {type(value).__name__} {short_repr(value)}",
                              fix=f"write the keys of {section} under it, indented")
    return data


def _packaged_root(recipes: Path) -> dict[str, Any]:
    with (recipes / "config.yaml").open(encoding="utf-8") as f:
        return yaml.load(f, Loader=get_yaml_loader())


def _merge_under(data: dict, base: dict) -> dict:
    """``data`` with the keys of ``base`` it lacks, recursively for mappings."""
    out = dict(data)
    for k, v in base.items():
        if k not in out:
            out[k] = v
        elif isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = _merge_under(out[k], v)
    return out


def file_kind(data: dict, path: Path) -> str:
    """``full`` (.json), ``model`` (keys are model fields only) or ``root``."""
    from composer.recipe.schema import ModelConfig
    if path.suffix == ".json":
        return "full"
    keys = set(data) - {"defaults"}
    if keys and not keys & set(SECTIONS) and keys <= set(ModelConfig.model_fields) \
            and "defaults" not in data:
        return "model"
    return "root"


def root_config(path: Path, recipes: Path) -> tuple[str, str, str, list[str]]:
    """(kind, config dir, config name, extra overrides) that compose the file at ``path``."""
    data = read_file(path)
    kind = file_kind(data, path)
    packaged = _packaged_root(recipes)
    fixed = {k: packaged[k] for k in ("kernels", "hydra") if k in packaged}
    if kind == "full":
        out = {"defaults": ["_self_"], **_merge_under(data, {"hydra": packaged["hydra"]})}
    elif kind == "model":
        groups = [g for g in packaged["defaults"] if isinstance(g, dict) and "model" not in g]
        out = {"defaults": [*groups, "_self_"], "model": data, **fixed}
    else:
        out = _merge_under(data, fixed)
        if "defaults" not in data:
            out = {"defaults": packaged["defaults"], **out}
    name = f"{path.stem}__{abs(hash(str(path.resolve()))) % 10**8}"
    try:
        text = OmegaConf.to_yaml(OmegaConf.create(out))
    except RecursionError:
        raise RecipeError(what=f"{path} refers to itself", where=str(path),
                          why="a YAML alias (*name) inside the node its anchor (&name) marks "
                              "makes an endless structure",
                          fix="replace the alias by a copy of what it should hold") from None
    (_tmpdir() / f"{name}.yaml").write_text(text, encoding="utf-8")
    search = f"hydra.searchpath=[file://{path.resolve().parent},pkg://recipes]"
    return "dir", str(_tmpdir()), name, [search]
