"""Vector gates, G = 1, shared q/k heads and the diagonal (Mamba-1) scan: reference == an
independent closed form, chunked == reference on outputs, final states and gradients, extreme
gates included (scalar-gate outputs: tests/test_ops.py)."""
import math

import pytest
import torch

from blocks.ops.recurrence import (recurrence_chunked, recurrence_reference, scan_chunked,
                                   scan_reference)

from conftest import rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
GATES = {"normal": lambda u: -u, "near0": lambda u: -30 - 20 * u,
         "near1": lambda u: -1e-6 * u, "zero": lambda u: -1e4 * (1 + u)}


def vector_inputs(B, T, H, K, V, dtype, gate="normal", state=True):
    g = torch.Generator().manual_seed(2000 + 7 * T + K)
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=g, dtype=dtype) / math.sqrt(K)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    log_g = GATES[gate](torch.rand(B, T, H, K, generator=g, dtype=dtype))
    s0 = torch.randn(B, H, K, V, generator=g, dtype=dtype) if state else None
    return q, k, v, log_g, s0


def closed_form_vector(q, k, v, log_g, s0):
    """The unrolled recurrence with per-key-dim decays, L = cumsum log g:
    o_t = sum_{s<=t} (sum_k q_tk k_sk exp(L_tk - L_sk)) v_s + (q_t * exp(L_t))^T S0,
    S_T = sum_s (k_s * exp(L_T - L_s)) v_s^T + exp(L_T) * S0, as one masked tensor expression."""
    L = log_g.cumsum(1)                                                  # (B, T, H, K)
    T = q.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None, None]
    w = (L[:, :, None] - L[:, None, :]).masked_fill(~mask, float("-inf")).exp()  # (B,t,s,H,K)
    scores = torch.einsum("bthk,bshk,btshk->btsh", q, k, w)
    o = torch.einsum("btsh,bshv->bthv", scores, v)
    S_T = torch.einsum("bshk,bshv->bhkv", k * (L[:, -1:] - L).exp(), v)
    if s0 is not None:
        o = o + torch.einsum("bthk,bhkv->bthv", q * L.exp(), s0)
        S_T = S_T + L[:, -1].exp()[..., None] * s0
    return o, S_T


@pytest.mark.parametrize("T", [1, 7, 100, 257])
@pytest.mark.parametrize("gate", ["normal", "near0", "near1"])
def test_vector_reference_matches_closed_form_float64(T, gate):
    args = vector_inputs(2, T, 3, 8, 5, torch.float64, gate)
    o, S = recurrence_reference(*args)
    o2, S2 = closed_form_vector(*args)
    assert rel_err(o, o2) < 1e-10 and rel_err(S, S2) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,chunk", [(1, 16), (15, 16), (33, 16), (50, 20), (100, 32),
                                     (300, 64)])
@pytest.mark.parametrize("gate", ["normal", "near0", "near1", "zero"])
@pytest.mark.parametrize("with_state", [True, False])
def test_vector_chunked_matches_reference(dtype, T, chunk, gate, with_state):
    args = vector_inputs(2, T, 3, 8, 6, dtype, gate, with_state)
    o1, S1 = recurrence_reference(*args)
    o2, S2 = recurrence_chunked(*args, chunk_size=chunk)
    assert rel_err(o2, o1) < TOL[dtype] and rel_err(S2, S1) < TOL[dtype]


def _grads(fn, args, seed):
    """Gradients of a random linear function of (o, final state) w.r.t. every input."""
    g = torch.Generator().manual_seed(seed)
    leaves = [a.clone().requires_grad_(True) for a in args]
    o, S = fn(*leaves)
    w1 = torch.randn(o.shape, generator=g, dtype=o.dtype)
    w2 = torch.randn(S.shape, generator=g, dtype=S.dtype)
    ((o * w1).sum() + (S * w2).sum()).backward()
    return [x.grad for x in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 45])
@pytest.mark.parametrize("gate", ["normal", "near0", "near1"])
@pytest.mark.parametrize("per", ["key_dim", "head"])
def test_chunked_gradients_match_reference_for_extreme_gates(dtype, T, gate, per):
    """Vector and scalar gates; the log-gate gradient stays accurate where exp(.) is tiny."""
    args = vector_inputs(2, T, 2, 8, 3, dtype, gate)
    if per == "head":
        args = args[:3] + (args[3][..., 0],) + args[4:]
    ref = _grads(recurrence_reference, args, T)
    chk = _grads(lambda *a: recurrence_chunked(*a, chunk_size=32), args, T)
    for name, g_ref, g_chk in zip("q k v log_g state".split(), ref, chk):
        assert rel_err(g_chk, g_ref) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,chunk", [(1, 8), (29, 8), (200, 64)])
def test_no_gate_is_plain_linear_attention(dtype, T, chunk):
    """log_g=None: o_t = sum_{s<=t} (q_t . k_s) v_s + S0^T q_t, both backends."""
    q, k, v, _, s0 = vector_inputs(2, T, 3, 4, 5, dtype)
    scores = torch.einsum("bthk,bshk->bhts", q, k).tril()
    expect = torch.einsum("bhts,bshv->bthv", scores, v) + torch.einsum("bthk,bhkv->bthv", q, s0)
    for fn in (recurrence_reference, lambda *a: recurrence_chunked(*a, chunk_size=chunk)):
        o, S = fn(q, k, v, None, s0)
        assert rel_err(o, expect) < TOL[dtype]
        assert rel_err(S, s0 + torch.einsum("bshk,bshv->bhkv", k, v)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per", ["key_dim", "head", "none"])
def test_heads_sharing_q_and_k(dtype, per):
    """q, k with Hk = 2 heads for H = 6: head h reads q, k of head h // 3 (Mamba-2's groups)."""
    q, k, v, lg, s0 = vector_inputs(2, 45, 6, 4, 5, dtype)
    q, k = q[:, :, :2], k[:, :, :2]
    lg = {"key_dim": lg, "head": lg[..., 0], "none": None}[per]
    o0, S0 = recurrence_reference(q.repeat_interleave(3, 2), k.repeat_interleave(3, 2), v, lg,
                                  s0)
    for fn in (recurrence_reference, lambda *a: recurrence_chunked(*a, chunk_size=16)):
        o, S = fn(q, k, v, lg, s0)
        assert rel_err(o, o0) < TOL[dtype] and rel_err(S, S0) < TOL[dtype]


def test_linear_attention_normaliser_from_a_ones_column():
    """v with a ones column: the last output column is phi(q_t) . sum_{s<=t} phi(k_s), so
    o[..., :-1] / o[..., -1] is Katharopoulos' normalised attention."""
    q, k, v, _, _ = vector_inputs(2, 40, 3, 4, 5, torch.float64, state=False)
    q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    o, _ = recurrence_chunked(q, k, torch.cat([v, torch.ones_like(v[..., :1])], -1), None,
                              chunk_size=16)
    att = torch.einsum("bthk,bshk->bhts", q, k).tril()
    att = att / att.sum(-1, keepdim=True)
    assert rel_err(o[..., :-1] / o[..., -1:], torch.einsum("bhts,bshv->bthv", att, v)) < 1e-10


def test_vector_state_splits_sequence():
    q, k, v, lg, s0 = vector_inputs(1, 50, 2, 4, 4, torch.float64)
    o, S = recurrence_chunked(q, k, v, lg, s0, chunk_size=16)
    a = 21
    oa, Sa = recurrence_chunked(q[:, :a], k[:, :a], v[:, :a], lg[:, :a], s0, chunk_size=16)
    ob, Sb = recurrence_chunked(q[:, a:], k[:, a:], v[:, a:], lg[:, a:], Sa, chunk_size=16)
    assert rel_err(torch.cat([oa, ob], 1), o) < 1e-12 and rel_err(Sb, S) < 1e-12


# --------------------------------------------------------------------------------------------
# Mamba-1's shape: selective_scan (and the same problem through gated_linear_recurrence)
# --------------------------------------------------------------------------------------------
def scan_inputs(B, T, D, N, dtype, gate="normal", state=True):
    g = torch.Generator().manual_seed(3000 + T)
    u = torch.randn(B, T, D, generator=g, dtype=dtype)
    dt = torch.rand(B, T, D, generator=g, dtype=dtype) + 0.05
    scale = {"normal": 1.0, "near0": 60.0, "near1": 1e-6}[gate]
    A = -scale * (torch.rand(D, N, generator=g, dtype=dtype) + 0.5)
    Bm = torch.randn(B, T, N, generator=g, dtype=dtype)
    Cm = torch.randn(B, T, N, generator=g, dtype=dtype)
    h0 = torch.randn(B, D, N, generator=g, dtype=dtype) if state else None
    return u, dt, A, Bm, Cm, h0


def as_recurrence(u, dt, A, Bm, Cm, h0):
    """The same scan as gated_linear_recurrence arguments: D heads, K = N, V = 1."""
    B, T, D = u.shape
    N = A.shape[-1]
    return (Cm[:, :, None].expand(B, T, D, N), Bm[:, :, None].expand(B, T, D, N),
            u[..., None], dt[..., None] * A, None if h0 is None else h0[..., None])


@pytest.mark.parametrize("gate", ["normal", "near0", "near1"])
def test_scan_reference_is_the_vector_gate_recurrence(gate):
    args = scan_inputs(2, 30, 6, 4, torch.float64, gate)
    y, h = scan_reference(*args)
    o, S = recurrence_reference(*as_recurrence(*args))
    assert rel_err(y, o[..., 0]) < 1e-12 and rel_err(h, S[..., 0]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,chunk", [(1, 16), (15, 16), (33, 16), (300, 64)])
@pytest.mark.parametrize("gate", ["normal", "near0", "near1"])
@pytest.mark.parametrize("with_state", [True, False])
def test_scan_chunked_matches_reference(dtype, T, chunk, gate, with_state):
    args = scan_inputs(2, T, 12, 16, dtype, gate, with_state)
    y1, h1 = scan_reference(*args)
    y2, h2 = scan_chunked(*args, chunk_size=chunk)
    assert rel_err(y2, y1) < TOL[dtype] and rel_err(h2, h1) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 41])
@pytest.mark.parametrize("gate", ["normal", "near0", "near1"])
def test_scan_chunked_gradients_match_reference(dtype, T, gate):
    args = scan_inputs(2, T, 6, 4, dtype, gate)
    ref = _grads(scan_reference, args, T)
    chk = _grads(lambda *a: scan_chunked(*a, chunk_size=8), args, T)
    for name, g_ref, g_chk in zip("u dt A B C state".split(), ref, chk):
        assert rel_err(g_chk, g_ref) < TOL[dtype], name


def test_mamba_shape_through_the_shared_op():
    """Many heads of K = 16, V = 1: the vector-gate chunked form agrees too."""
    args = as_recurrence(*scan_inputs(1, 70, 48, 16, torch.float64))
    o1, S1 = recurrence_reference(*args)
    o2, S2 = recurrence_chunked(*args, chunk_size=32)
    assert rel_err(o2, o1) < 1e-10 and rel_err(S2, S1) < 1e-10


def test_registry_picks_chunked_for_both_ops():
    from composer.registry import resolve_backend
    cpu = torch.device("cpu")
    for name in ("gated_linear_recurrence", "selective_scan"):
        assert resolve_backend(name, "auto", cpu, torch.float32).name == "chunked"
