"""Op ``delta_rule``: reference == the textbook recurrences written as explicit matrix products;
chunked == reference on outputs, final states and gradients, for every form the op takes."""
import math

import pytest
import torch
import torch.nn.functional as F

from blocks.ops.delta.chunked import delta_chunked
from blocks.ops.delta.reference import delta_reference

from helpers import rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
# plain delta rule (b one number per token): without decay, one decay per head, one per key
# channel; generalised (a, b vectors, RWKV-7 style): per-channel and per-head decay
MODES = ["delta", "gated", "vector", "rwkv", "dplr_scalar"]
GATES = {"normal": lambda u: -u, "near0": lambda u: -30 - 20 * u, "near1": lambda u: -1e-6 * u}


def inputs(mode, B, T, H, K, V, dtype, gate="normal", state=True, seed=0):
    """(q, k, v, b, log_w, state, a) for ``mode``: unit keys, beta and a_icl in (0, 1)."""
    g = torch.Generator().manual_seed(seed + 7 * T + MODES.index(mode))
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=dtype)   # noqa: E731
    q, v = r(B, T, H, K) / math.sqrt(K), r(B, T, H, V)
    k = F.normalize(r(B, T, H, K), dim=-1)
    s0 = r(B, H, K, V) if state else None
    decay = {"delta": None, "gated": (B, T, H), "vector": (B, T, H, K), "rwkv": (B, T, H, K),
             "dplr_scalar": (B, T, H)}[mode]
    log_w = None if decay is None else GATES[gate](u(*decay))
    if mode in ("rwkv", "dplr_scalar"):
        kappa = F.normalize(r(B, T, H, K), dim=-1)
        return q, k, v, kappa * u(B, T, H, K), log_w, s0, -kappa
    return q, k, v, -u(B, T, H), log_w, s0, None


def textbook_delta(q, k, v, beta, log_alpha, s0):
    """Gated DeltaNet as its paper writes it: S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1}
    + beta_t k_t v_t^T, with the K x K transition built explicitly each step."""
    B, T, H, K = q.shape
    S = s0.clone() if s0 is not None else q.new_zeros(B, H, K, v.shape[-1])
    eye = torch.eye(K, dtype=q.dtype)
    out = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        alpha = 1.0 if log_alpha is None else log_alpha[:, t].exp()[..., None, None]
        P = alpha * (eye - bt * kt[..., :, None] * kt[..., None, :])           # (B, H, K, K)
        S = P @ S + bt * kt[..., :, None] * v[:, t, :, None, :]
        out.append((S.transpose(-1, -2) @ q[:, t, ..., None])[..., 0])
    return torch.stack(out, 1), S


def rwkv7_transposed(q, k, v, a, b, log_w, s0):
    """RWKV-7's own convention, state V x K: P_t = P_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T,
    o_t = P_t q_t. Returns the state transposed back to K x V."""
    B, T, H, K = q.shape
    P = s0.transpose(-1, -2).clone() if s0 is not None else q.new_zeros(B, H, v.shape[-1], K)
    out = []
    for t in range(T):
        w = log_w[:, t].exp()
        w = torch.diag_embed(w if log_w.dim() == 4 else w[..., None].expand(B, H, K))
        P = P @ (w + a[:, t, ..., :, None] * b[:, t, ..., None, :]) \
            + v[:, t, ..., :, None] * k[:, t, ..., None, :]
        out.append((P @ q[:, t, ..., None])[..., 0])
    return torch.stack(out, 1), P.transpose(-1, -2)


@pytest.mark.parametrize("T", [1, 9, 70])
@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("mode", ["delta", "gated"])
def test_reference_matches_textbook_delta_rule(mode, gate, T):
    if mode == "delta" and gate != "normal":
        pytest.skip("no decay")
    q, k, v, nb, log_a, s0, _ = inputs(mode, 2, T, 3, 6, 4, torch.float64, gate)
    beta = -nb
    alpha = 1.0 if log_a is None else log_a.exp()
    o, S = delta_reference(q, k, v * beta[..., None], -(alpha * beta), log_a, s0)
    o2, S2 = textbook_delta(q, k, v, beta, log_a, s0)
    assert rel_err(o, o2) < 1e-10 and rel_err(S, S2) < 1e-10


@pytest.mark.parametrize("T", [1, 9, 70])
@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("mode", ["rwkv", "dplr_scalar"])
def test_reference_matches_rwkv7_convention(mode, gate, T):
    q, k, v, b, log_w, s0, a = inputs(mode, 2, T, 3, 6, 4, torch.float64, gate)
    o, S = delta_reference(q, k, v, b, log_w, s0, a=a)
    o2, S2 = rwkv7_transposed(q, k, v, a, b, log_w, s0)
    assert rel_err(o, o2) < 1e-10 and rel_err(S, S2) < 1e-10


CHUNK_CASES = [(1, 16), (15, 16), (33, 16), (100, 32), (300, 64)]


def _chunk_params():
    for mode in MODES:
        for gate in GATES if mode != "delta" else ["normal"]:
            yield mode, gate


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("T,chunk", CHUNK_CASES)
@pytest.mark.parametrize("mode,gate", list(_chunk_params()))
def test_chunked_matches_reference(mode, gate, T, chunk, dtype):
    with_state = (T + len(gate)) % 2 == 0          # half the cases start from a random state
    q, k, v, b, log_w, s0, a = inputs(mode, 2, T, 3, 8, 6, dtype, gate, with_state)
    o1, S1 = delta_reference(q, k, v, b, log_w, s0, a=a)
    o2, S2 = delta_chunked(q, k, v, b, log_w, s0, a=a, chunk_size=chunk)
    assert rel_err(o2, o1) < TOL[dtype] and rel_err(S2, S1) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("T,gate", [(1, "normal"), (37, "normal"), (37, "near0")])
@pytest.mark.parametrize("mode", MODES)
def test_chunked_gradients_match_reference(mode, T, gate, dtype):
    if mode == "delta" and gate != "normal":
        pytest.skip("no decay")
    args = inputs(mode, 2, T, 2, 4, 3, dtype, gate)
    g = torch.Generator().manual_seed(5)
    w_o = torch.randn(2, T, 2, 3, generator=g, dtype=dtype)   # random cotangents
    w_s = torch.randn(2, 2, 4, 3, generator=g, dtype=dtype)
    grads = []
    for fn in (delta_reference, lambda *x, a: delta_chunked(*x, a=a, chunk_size=16)):
        leaves = [x.clone().requires_grad_(True) if x is not None else None for x in args]
        o, S = fn(*leaves[:6], a=leaves[6])
        ((o * w_o).sum() + (S * w_s).sum()).backward()
        grads.append([x.grad for x in leaves if x is not None])
    for g_ref, g_chk in zip(*grads):
        assert rel_err(g_chk, g_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("T,chunk", [(1, 16), (16, 16), (45, 16), (64, 8)])
@pytest.mark.parametrize("mode,gate", [p for p in _chunk_params() if p[0] in ("delta", "gated")])
@pytest.mark.parametrize("state", [True, False])
def test_plain_form_gradients(monkeypatch, state, mode, gate, T, chunk, dtype):
    """The plain delta rule with one decay per head or none runs the hand-written form
    (checked to be the one that runs): every gradient equals the reference's, with and
    without an initial state, only the outputs in the loss (no final-state cotangent), and
    T below, at and past whole chunks."""
    import blocks.ops.delta.chunked as d
    calls = []
    monkeypatch.setattr(d._PlainDelta, "apply",
                        lambda *x, _f=d._PlainDelta.apply: calls.append(1) or _f(*x))
    args = inputs(mode, 2, T, 3, 8, 5, dtype, gate, state)[:6]
    w_o = torch.randn(2, T, 3, 5, generator=torch.Generator().manual_seed(T), dtype=dtype)
    grads = []
    for fn in (delta_reference, lambda *x: delta_chunked(*x, chunk_size=chunk)):
        leaves = [x.clone().requires_grad_(True) if x is not None else None for x in args]
        o, _ = fn(*leaves)
        (o * w_o).sum().backward()
        grads.append([x.grad for x in leaves if x is not None])
    for g_ref, g_chk in zip(*grads):
        assert torch.isfinite(g_chk).all() and rel_err(g_chk, g_ref) < TOL[dtype]
    assert calls


def test_plain_form_only_for_scalar_decay(monkeypatch):
    """Per-channel decays and the generalised rule (a, b vectors) keep the general path."""
    import blocks.ops.delta.chunked as d
    calls = []
    monkeypatch.setattr(d._PlainDelta, "apply",
                        lambda *x, _f=d._PlainDelta.apply: calls.append(1) or _f(*x))
    for mode in ("vector", "rwkv", "dplr_scalar"):
        q, k, v, b, lw, s0, a = inputs(mode, 1, 20, 2, 4, 3, torch.float64)
        o1, _ = delta_chunked(q, k, v, b, lw, s0, a=a, chunk_size=8)
        o2, _ = delta_reference(q, k, v, b, lw, s0, a=a)
        assert rel_err(o1, o2) < 1e-10
    assert not calls
    q, k, v, b, lw, s0, a = inputs("gated", 1, 20, 2, 4, 3, torch.float64)
    delta_chunked(q, k, v, b, lw.detach(), s0, chunk_size=8)
    assert calls


@pytest.mark.parametrize("mode", MODES)
def test_state_splits_sequence(mode):
    q, k, v, b, lw, s0, a = inputs(mode, 2, 50, 2, 4, 4, torch.float64)
    cut = lambda x, s: None if x is None else x[:, s]  # noqa: E731
    first, second = slice(0, 21), slice(21, None)
    o, S = delta_chunked(q, k, v, b, lw, s0, a=a, chunk_size=8)
    oa, Sa = delta_chunked(q[:, first], k[:, first], v[:, first], b[:, first], cut(lw, first),
                           s0, a=cut(a, first), chunk_size=8)
    ob, Sb = delta_chunked(q[:, second], k[:, second], v[:, second], b[:, second],
                           cut(lw, second), Sa, a=cut(a, second), chunk_size=8)
    assert rel_err(torch.cat([oa, ob], 1), o) < 1e-12 and rel_err(Sb, S) < 1e-12


def test_auto_backend_is_chunked_and_op_call_matches():
    from composer.core.kernels import op, use_kernels
    from composer.core.registry import resolve_backend
    assert resolve_backend("delta_rule", "auto", torch.device("cpu"),
                           torch.float32).name == "chunked"
    q, k, v, b, lw, s0, a = inputs("rwkv", 1, 5, 2, 4, 3, torch.float64)
    with use_kernels({"delta_rule": "reference"}):
        o_ref, _ = op("delta_rule")(q, k, v, b, lw, s0, a=a)
    o_auto, _ = op("delta_rule")(q, k, v, b, lw, s0, a=a)
    assert rel_err(o_auto, o_ref) < 1e-12


@pytest.mark.parametrize("backend", [delta_reference, delta_chunked], ids=["reference", "chunked"])
@pytest.mark.parametrize("mode", MODES)
def test_float32_inside_under_bf16_autocast(backend, mode):
    """A bf16 autocast around the op (as training with dtype bf16 puts one) leaves its float32
    products alone: outputs, state and gradients equal those without autocast."""
    args = inputs(mode, 2, 37, 2, 8, 4, torch.float32)
    res = []
    for on in (False, True):
        leaves = [x.clone().requires_grad_(True) if x is not None else None for x in args]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            o, S = backend(*leaves[:6], a=leaves[6])
        (o.square().sum() + S.sum()).backward()
        res.append([o, S] + [x.grad for x in leaves if x is not None])
    for off, on in zip(*res):
        assert on.dtype == torch.float32 and rel_err(on, off) < 1e-6
