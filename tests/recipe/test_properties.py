"""Property-based tests of the recipe language, with cases generated from the schema itself.

Every generated case -- a recipe dict for ``composer.validate_recipe``, a list of Hydra
override strings for ``composer.load_recipe`` (as users write them), or the bytes of a recipe
file given by path -- must either

(a) validate, and then ``composer.layer_graph`` builds a graph whose parameter total equals
    the model built on the meta device (``with torch.device("meta"): build_model(recipe)``);
(b) or raise the project's user error, :class:`composer.core.errors.HycompError` or a subclass
    (from validation, or from ``layer_graph`` where it checks sizes): no TypeError,
    ValueError, IndexError, ZeroDivisionError, RecursionError, MemoryError (address space is
    capped at +2 GiB per case), Pydantic ValidationError or Hydra/OmegaConf error escapes;
(c) and answer within seconds (Hypothesis' ``deadline``, 5 s; a case still running after 15 s
    is interrupted and fails).

The strategies walk the Pydantic models (types, ``Literal`` choices, ``Field`` bounds, nested
models, dict fields such as ``model.blocks`` / ``symbols`` / ``kernels``) and the block and
kernel registries, mixing valid values with edge values (0, -1, bounds and one past them, 1e9,
10**12, NaN, inf, empty strings and lists), wrong types, unknown keys, names and symbols and
every schedule form with per-layer overrides. They live in ``tools/fuzz_recipes.py``, which
runs them for as long as you like (``--seconds``, ``--examples``, ``--seed``); this module
loads that file by path (``tools/`` is not a package; its docstring says why the strategies
live there and not here).

Profiles: ``ci`` (the default: derandomised, so CI is deterministic, and a few hundred cases in
all, under a minute on 2 cores) and ``long`` (random, 20 times as many cases), picked with the
environment variable ``HYCOMP_HYPOTHESIS_PROFILE=long``. No example database is written.

``test_found_escapes_answer_with_a_user_error`` replays, one by one, the minimal
reproductions of the escapes the fuzzing found (``tools/fuzz_recipes.py`` shrinks them), so
each stays covered whatever the generator draws.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    name = "hycomp_tools_fuzz_recipes"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "fuzz_recipes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod            # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    return mod


fz = _load_tool()

_COMMON = dict(deadline=5000, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
# ci: no shrinking, so a failing run stays within the CI budget (the failing case is printed
# whole; tools/fuzz_recipes.py or the long profile shrink it)
settings.register_profile("ci", derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
PROFILE_NAME = os.environ.get("HYCOMP_HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)
SCALE = 20 if PROFILE_NAME == "long" else 1
HARD_LIMIT_S = 15


@pytest.fixture(scope="module", autouse=True)
def _warm():
    """Pay Hydra's first initialisation and the first meta build outside the deadline."""
    fz.check_overrides(("config", ["model.d_model=32"]))
    fz.check_overrides(("hymba_tiny", []))


@settings(PROFILE, max_examples=200 * SCALE)
@given(fz.recipe_dicts())
def test_generated_recipe_dicts_build_or_are_refused(recipe):
    fz.assert_property(fz.check_dict(recipe, hard_limit=HARD_LIMIT_S), recipe)


@settings(PROFILE, max_examples=60 * SCALE)
@given(fz.override_sets())
def test_generated_overrides_build_or_are_refused(case):
    fz.assert_property(fz.check_overrides(case, hard_limit=HARD_LIMIT_S), case)


@settings(PROFILE, max_examples=30 * SCALE)
@given(fz.recipe_files())
def test_generated_recipe_files_build_or_are_refused(content):
    fz.assert_property(fz.check_file(content, hard_limit=HARD_LIMIT_S), content)


# Minimal reproductions of escapes found by this module and tools/fuzz_recipes.py (each failed
# when found): each must now be refused with a HycompError, or validate and build, in time.
FOUND = {
    # ValueError from Hydra's defaults list: an override without a key is a group override
    "override_without_key": ("config", ["=3"]),
    # MemoryError in placement.place_even: the depth becomes a list before any size check
    "ratio_depth_1e9": ("config", ["model.n_layers=1000000000"]),
    # MemoryError (or minutes) in placement.repeat_to: a pattern repeated to 1e9 entries
    "pattern_depth_1e9": ("config", ["model.schedule.pattern=M", "model.n_layers=1000000000"]),
    # validated, then layer_graph built 200,000 sub-layers on the meta device: minutes
    "depth_100000": ("config", ["model.n_layers=100000"]),
    # TypeError from torch.empty (int64 overflow) in a block's __init__ under layer_graph: a
    # size field just past 2**63 - 1 validates; 10**12 is refused or counted on the meta device
    "block_field_2pow63": ("config", ["model.blocks.mamba2.d_conv=9223372036854775808"]),
    # the same in layer_graph's own size check (costs._count caught RuntimeError only)
    "d_model_2pow63": ("config", ["model.d_model=9223372036854775808"]),
    # RecursionError: a YAML alias that contains itself
    "file_self_alias": b"model: &a [*a]",
    # AttributeError in compose._form_rule: a model section that is not a mapping (also
    # `model: !!binary aGVsbG8=`, bytes, and `model: ${oc.env:X}`, a string)
    "file_model_not_a_mapping": b"model: 3",
    # ValueError from Hydra: defaults that are not a list
    "file_defaults_not_a_list": b"defaults: 3",
}


@pytest.mark.parametrize("case", list(FOUND.values()), ids=list(FOUND))
def test_found_escapes_answer_with_a_user_error(case):
    kw = dict(hard_limit=10, slow=5)
    if isinstance(case, tuple):
        out = fz.check_overrides(case, **kw)
    elif isinstance(case, bytes):
        out = fz.check_file(case, **kw)
    else:
        out = fz.check_dict(case, **kw)
    fz.assert_property(out, case)


def test_the_generators_reach_both_outcomes():
    """The property is not vacuous: the ci cases both validate and get refused, often."""
    counts = {"dicts": {}, "overrides": {}}

    @settings(PROFILE, max_examples=25, deadline=None)
    @given(fz.recipe_dicts())
    def dicts(d):
        k = fz.check_dict(d, hard_limit=HARD_LIMIT_S).kind
        counts["dicts"][k] = counts["dicts"].get(k, 0) + 1

    @settings(PROFILE, max_examples=15, deadline=None)
    @given(fz.override_sets())
    def overrides(case):
        k = fz.check_overrides(case, hard_limit=HARD_LIMIT_S).kind
        counts["overrides"][k] = counts["overrides"].get(k, 0) + 1

    dicts()
    overrides()
    for name, c in counts.items():
        assert c.get("validated", 0) >= 3 and c.get("refused", 0) >= 3, (name, c)
