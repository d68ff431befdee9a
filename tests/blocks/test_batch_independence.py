"""Batch independence: a sample's output never depends on the other samples of its batch.

For every block case of ``tests/cases`` (every registered block family) and every packaged
model recipe (``recipes/model/*.yaml``, shrunk to d_model 32; the composite ``parallel`` block
is covered through recipes, ``hymba_tiny`` and one of its own below), built in float64: run a
batch of 3 (and of 2) random sequences, replace sample 1 by other random values, and check that
the outputs of every other sample are unchanged to 1e-12 (in practice bitwise or within a few
ulps: only the shapes of some grouped matmuls change with the replaced sample), in three modes:

* ``forward`` over the whole sequence;
* ``forward`` with carried state: a prefix, then the rest with the returned state (sample 1 is
  replaced in both parts, so the state handed across the split is checked too);
* ``step``: single-token decoding from ``init_state`` (blocks), one-token forwards with the
  carried state (models).

Routed and MoE blocks. Neither couples samples by design, so the full property is tested for
them too: ``moe`` dispatches every (token, expert) pair with no capacity limit and drops no
token (``blocks/moe.py``: "no capacity, no dropped tokens"); ``routed`` decides per token from
x_t alone (threshold or argmax; Raposo et al.'s top-c capacity enters only the auxiliary loss's
target) and its sequence-mixer paths run per batch row. What *does* depend on the whole batch is
their auxiliary loss (Switch's load balance and the skip mode's capacity BCE are batch
statistics); that is a training signal, not an output, and is not checked here.

Not tested here: a ``parallel`` block whose branch is itself ``parallel`` (nesting), a known bug
being fixed separately (refused or built correctly).
"""
from __future__ import annotations

import pytest
import torch

import composer
from composer.core.kernels import use_kernels
from composer.core.registry import block_types, ops
from composer.recipe.compose import group_options

from cases import all_cases
from helpers import recipe_from

D = 32
SPECS = all_cases()
T, SPLIT = 13, 6
TOL = 1e-12
CHANGED = 1


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the cases are tiny, and on a loaded 2-core machine torch's worker
    threads make some float64 kernels (depthwise conv1d) take a second a call instead of a
    millisecond. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_block(name: str):
    raw = dict(SPECS[name])
    kind = raw.pop("kind", name)
    bt = block_types()[kind]
    torch.manual_seed(0)
    return bt.module(bt.spec(kind=kind, **raw), D).double()


def _others(B: int) -> list[int]:
    return [b for b in range(B) if b != CHANGED]


def assert_others_unchanged(y: torch.Tensor, y2: torch.Tensor, what: str) -> None:
    """Rows other than CHANGED agree to TOL; row CHANGED differs (the check is not vacuous)."""
    keep = _others(y.shape[0])
    diff = (y[keep] - y2[keep]).abs().max().item()
    scale = max(1.0, y[keep].abs().max().item())
    assert diff <= TOL * scale, (f"{what}: samples {keep} changed by {diff:.3g} when only "
                                 f"sample {CHANGED} was replaced")
    assert not torch.equal(y[CHANGED], y2[CHANGED]), f"{what}: sample {CHANGED} did not change"


def _pair_of_inputs(B: int, make_input):
    torch.manual_seed(1)
    x = make_input(B)
    x2 = x.clone()
    x2[CHANGED] = make_input(1)[0]
    return x, x2


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
def block_forward(blk, x):
    y, _ = blk(x)
    return y


def block_carried(blk, x):
    st = blk.init_state(x.shape[0], x.device, x.dtype)
    ya, st = blk(x[:, :SPLIT], st)
    yb, _ = blk(x[:, SPLIT:], st)
    return torch.cat([ya, yb], 1)


def block_steps(blk, x):
    st = blk.init_state(x.shape[0], x.device, x.dtype)
    rows = []
    for t in range(x.shape[1]):
        yt, st = blk.step(x[:, t], st)
        rows.append(yt)
    return torch.stack(rows, 1)


BLOCK_MODES = {"forward": block_forward, "carried": block_carried, "step": block_steps}


def test_every_registered_block_type_is_covered():
    """Every sequence block type has a case here; the composite one runs through recipes."""
    kinds = {SPECS[n].get("kind", n) for n in SPECS}
    for name, bt in block_types().items():
        if bt.role == "composite":
            assert name == "parallel", f"composite block '{name}' has no recipe test here"
        else:
            assert name in kinds, name


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("B", [3, 2])
def test_block_outputs_of_other_samples_are_unchanged(name, backend, B):
    blk = make_block(name)
    x, x2 = _pair_of_inputs(B, lambda b: torch.randn(b, T, D, dtype=torch.float64))
    with torch.no_grad(), use_kernels({op: backend for op in ops()}):
        for mode, run in BLOCK_MODES.items():
            assert_others_unchanged(run(blk, x), run(blk, x2), f"{name} [{backend}] {mode}")


# --------------------------------------------------------------------------------------------
# Models: every packaged recipe, small
# --------------------------------------------------------------------------------------------
SMALL = ["model.d_model=32"]
EXTRA = {
    "gemma3_tiny": ["model.n_layers=6", "model.blocks.attention.window=4"],  # global at 5
    "hymba_tiny": ["model.blocks.swa.window=3"],
    "multilevel_tiny": ["model.blocks.local.window=5"],
    "samba_tiny": ["model.blocks.swa.window=4"],
    "recurrentgemma_tiny": ["model.blocks.local.window=4"],
}
"""Windows shorter than T, so the sliding-window caches drop tokens within the test."""


def _model_from_recipe(recipe):
    torch.manual_seed(0)
    return composer.build_model(recipe).double().eval()


def model_forward(m, ids):
    return m(ids)


def model_carried(m, ids):
    st = m.init_state(ids.shape[0], dtype=torch.float64)
    a, st = m(ids[:, :SPLIT], st, return_state=True)
    b, _ = m(ids[:, SPLIT:], st, return_state=True)
    return torch.cat([a, b], 1)


def model_steps(m, ids):
    st = m.init_state(ids.shape[0], dtype=torch.float64)
    rows = []
    for t in range(ids.shape[1]):
        y, st = m(ids[:, t:t + 1], st, return_state=True)
        rows.append(y)
    return torch.cat(rows, 1)


MODEL_MODES = {"forward": model_forward, "carried": model_carried, "step": model_steps}


def check_model(m, B: int, what: str) -> None:
    V = m.embed.num_embeddings
    ids, ids2 = _pair_of_inputs(B, lambda b: torch.randint(0, V, (b, T)))
    with torch.no_grad():
        for mode, run in MODEL_MODES.items():
            assert_others_unchanged(run(m, ids), run(m, ids2), f"{what} {mode}")


@pytest.mark.parametrize("name", group_options("model"))
@pytest.mark.parametrize("B", [3, 2])
def test_packaged_recipe_outputs_of_other_samples_are_unchanged(name, B):
    r = composer.load_recipe(name, SMALL + EXTRA.get(name, []))
    check_model(_model_from_recipe(r), B, name)


_ATTN = {"kind": "attention", "n_heads": 2, "n_kv_heads": 1}
RECIPES = {
    # parallel branches of several families, one of them sliding-window, HF counting
    "parallel_three_branches": {
        "d_model": D, "n_layers": 2, "max_seq_len": 64,
        "blocks": {"par": {"kind": "parallel", "branches": ["swa", "gdn", "rwkv7"],
                           "combine": "sum", "norm_outputs": False},
                   "swa": {**_ATTN, "window": 3},
                   "gdn": {"kind": "gated_deltanet", "n_k_heads": 2, "n_v_heads": 2,
                           "head_k_dim": 8, "head_v_dim": 8, "chunk_size": 4},
                   "rwkv7": {"head_dim": 8, "decay_rank": 4, "a_rank": 4, "gate_rank": 4,
                             "chunk_size": 4}},
        "schedule": {"layers": ["par", "par"]}},
    # routed and MoE in a model: Megatron counting, a routed mixer with a MoE path, MoE FFNs
    "routed_and_moe": {
        "d_model": D, "ffn": None, "max_seq_len": 64,
        "blocks": {"Y": {"kind": "routed", "mode": "choice",
                         "paths": [{**_ATTN, "window": 4},
                                   {"kind": "moe", "n_experts": 3, "top_k": 1,
                                    "expert": {"d_ff": 8}}]},
                   "moe": {"n_experts": 4, "top_k": 2, "expert": {"d_ff": 16},
                           "shared_expert": {"d_ff": 8}, "shared_expert_gate": True},
                   "skip": {"kind": "routed", "threshold": 0.45,
                            "paths": [{"kind": "mamba2", "d_state": 4, "head_dim": 16,
                                       "chunk_size": 4}]}},
        "symbols": {"S": "skip", "y": "Y"},
        "schedule": {"pattern": "yES-yE"}},
}


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("B", [3, 2])
def test_composite_recipe_outputs_of_other_samples_are_unchanged(name, B):
    check_model(_model_from_recipe(recipe_from(RECIPES[name])), B, name)
