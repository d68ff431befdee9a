"""Every block: whole sequence == carried state == single-token steps; cost hooks.

Cases come from ``tests/cases/*.py`` (one module per block family)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from composer.core.block import state_nbytes
from composer.core.kernels import use_kernels
from composer.core.registry import block_types, ops

from helpers import rel_err

from cases import all_cases

D = 32
SPECS = all_cases()


def all_ops(backend: str) -> dict[str, str]:
    """Every op on ``backend`` (every op has a reference backend; auto is always valid)."""
    return {op: backend for op in ops()}


def make(name):
    raw = dict(SPECS[name])
    kind = raw.pop("kind", name)
    bt = block_types()[kind]
    torch.manual_seed(0)
    return bt.module(bt.spec(kind=kind, **raw), D).double()


def test_every_registered_sequence_block_is_covered():
    kinds = {SPECS[n].get("kind", n) for n in SPECS}
    seq = {n for n, bt in block_types().items() if bt.role != "composite"}
    assert seq <= kinds


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("T,split", [(1, 0), (13, 6), (24, 8), (17, 1)])
def test_three_modes_agree(name, backend, T, split):
    blk = make(name)
    x = torch.randn(2, T, D, dtype=torch.float64)
    with use_kernels(all_ops(backend)):
        y, _ = blk(x)
        # carried state: forward(x[:, :a]) then forward(x[:, a:], state)
        st = blk.init_state(2, x.device, torch.float64)
        ya, st = blk(x[:, :split], st) if split else (x[:, :0], st)
        yb, _ = blk(x[:, split:], st)
        assert rel_err(torch.cat([ya, yb], 1), y) < 1e-10
        # one token at a time
        st = blk.init_state(2, x.device, torch.float64)
        rows = []
        for t in range(T):
            yt, st = blk.step(x[:, t], st)
            rows.append(yt)
        assert rel_err(torch.stack(rows, 1), y) < 1e-10


@pytest.mark.parametrize("name", SPECS)
def test_reference_and_fast_backends_agree_float32(name):
    blk = make(name).float()
    x = torch.randn(2, 40, D)
    with use_kernels(all_ops("reference")):
        y_ref, _ = blk(x)
    y_fast, _ = blk(x)
    assert rel_err(y_fast, y_ref) < 1e-4


@pytest.mark.parametrize("name", SPECS)
def test_gradients_flow_to_every_parameter(name):
    blk = make(name)
    y, _ = blk(torch.randn(2, 9, D, dtype=torch.float64))
    y.square().sum().backward()
    for n, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", SPECS)
def test_bf16_autocast_forward_and_backward(name):
    """Training with dtype bf16 runs the forward under autocast: every block's auto backends
    take bf16 activations (the recurrences keep their float32 state and products) and the
    gradients reach every parameter, finite. The output stays within bf16 rounding of the
    float32 one, except where a router decides: there bf16 logits may send a token near the
    threshold down another path."""
    blk = make(name).float()
    x = torch.randn(2, 37, D)
    y32, _ = blk(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = blk(x)
    y.float().square().sum().backward()
    if SPECS[name].get("kind", name) != "routed":
        assert rel_err(y.float(), y32) < 0.03       # measured: at most 0.009
    for n, p in blk.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_sliding_window_state_is_constant_size():
    blk = make("attention_window")
    st = blk.init_state(1, "cpu", torch.float64)
    for _ in range(12):
        _, st = blk.step(torch.randn(1, D, dtype=torch.float64), st)
    # window 5: a ring of 5 slots (the current token is written before it attends)
    assert st.held() == 5 and st.k.shape[2] == 5 and st.pos == 12
    bt = block_types()["attention"]
    assert bt.module.state_bytes(blk.spec, D, 10_000) == bt.module.state_bytes(blk.spec, D, 100)


def test_mlp_flops_match_torch_flop_counter():
    for name in ("mlp", "mlp_gelu"):
        blk = make(name)
        x = torch.randn(1, 16, D, dtype=torch.float64)
        with FlopCounterMode(display=False) as fc:
            blk(x)
        assert fc.get_total_flops() == 16 * type(blk).flops_per_token(blk.spec, D, 16)


def test_attention_projection_flops_match_counter():
    blk = make("attention")
    T = 16
    x = torch.randn(1, T, D, dtype=torch.float64)
    with FlopCounterMode(display=False) as fc:
        with use_kernels({"attention": "reference"}):
            blk(x)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    proj = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)
    hd = D // 4
    expected_proj = T * 2 * (D * D + D * 2 * 2 * hd + D * D)
    assert proj == expected_proj
    # the model counts causal (T+1)/2 keys per query; the reference computes all T x T scores
    full = counts["aten.bmm"] if "aten.bmm" in counts else counts["aten.matmul"]
    model_attn = T * (type(blk).flops_per_token(blk.spec, D, T) - expected_proj / T)
    assert model_attn == pytest.approx(full * (T + 1) / (2 * T))


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("T", [3, 40])
def test_state_bytes_match_real_state_tensors(name, T):
    """The cost model's state size equals the real state. Two are upper bounds by design:
    routed (a path's state grows only with the tokens routed to it) and block_attention (the
    cache of the last token's block: the model reports its largest size, b positions)."""
    blk = make(name).float()
    _, st = blk(torch.randn(1, T, D), blk.init_state(1, "cpu", torch.float32))
    model = type(blk).state_bytes(blk.spec, D, T, 4)
    if blk.spec.kind in ("routed", "block_attention"):
        assert state_nbytes(st) <= model
    else:
        assert model == state_nbytes(st), name
