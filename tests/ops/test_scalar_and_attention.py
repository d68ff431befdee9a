"""Ops: chunked == reference == an independent closed form; sdpa == reference attention."""
import math

import pytest
import torch

from blocks.ops.attention.reference import attention_reference
from blocks.ops.attention.sdpa import attention_sdpa
from blocks.ops.recurrence.chunked import recurrence_chunked
from blocks.ops.recurrence.reference import recurrence_reference

from helpers import rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def recurrence_inputs(B, T, H, K, V, dtype, gate="normal", state=True):
    g = torch.Generator().manual_seed(1000 + T)
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=g, dtype=dtype) / math.sqrt(K)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    u = torch.rand(B, T, H, generator=g, dtype=dtype)
    log_g = {"normal": -u, "near0": -30 - 20 * u, "near1": -1e-6 * u}[gate]
    s0 = torch.randn(B, H, K, V, generator=g, dtype=dtype) if state else None
    return q, k, v, log_g, s0


def closed_form(q, k, v, log_g, s0):
    """o_t = sum_{s<=t} exp(L_t - L_s) (q_t.k_s) v_s + exp(L_t) S0^T q_t with L = cumsum log g:
    the unrolled recurrence, computed as one masked quadratic form (independent of both
    backends)."""
    L = log_g.cumsum(1)                                               # (B, T, H)
    T = q.shape[1]
    diff = L[:, :, None, :] - L[:, None, :, :]                        # (B, t, s, H)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None]
    w = diff.masked_fill(~mask, float("-inf")).exp()
    qk = torch.einsum("bthk,bshk->btsh", q, k)
    o = torch.einsum("btsh,bshv->bthv", qk * w, v)
    S_T = torch.einsum("bsh,bshk,bshv->bhkv", (L[:, -1:] - L).exp(), k, v)
    if s0 is not None:
        o = o + torch.einsum("bth,bhkv,bthk->bthv", L.exp(), s0, q)
        S_T = S_T + L[:, -1].exp()[..., None, None] * s0
    return o, S_T


@pytest.mark.parametrize("T", [1, 7, 64, 100, 257])
@pytest.mark.parametrize("gate", ["normal", "near0", "near1"])
def test_reference_matches_closed_form_float64(T, gate):
    args = recurrence_inputs(2, T, 3, 8, 5, torch.float64, gate)
    o, S = recurrence_reference(*args)
    o2, S2 = closed_form(*args)
    assert rel_err(o, o2) < 1e-10 and rel_err(S, S2) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,chunk", [(1, 16), (15, 16), (16, 16), (33, 16), (100, 32),
                                     (513, 64)])
@pytest.mark.parametrize("gate", ["normal", "near0", "near1"])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunked_matches_reference(dtype, T, chunk, gate, with_state):
    args = recurrence_inputs(2, T, 3, 8, 6, dtype, gate, with_state)
    o1, S1 = recurrence_reference(*args)
    o2, S2 = recurrence_chunked(*args, chunk_size=chunk)
    assert rel_err(o2, o1) < TOL[dtype] and rel_err(S2, S1) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 37])
def test_chunked_gradients_match_reference(dtype, T):
    args = recurrence_inputs(2, T, 2, 4, 3, dtype, "normal")
    w1 = torch.randn(2, T, 2, 3, dtype=dtype)   # random cotangents for o and the final state
    w2 = torch.randn(2, 2, 4, 3, dtype=dtype)
    grads = []
    for fn in (recurrence_reference, lambda *a: recurrence_chunked(*a, chunk_size=16)):
        leaves = [a.clone().requires_grad_(True) for a in args]
        o, S = fn(*leaves)
        ((o * w1).sum() + (S * w2).sum()).backward()
        grads.append([x.grad for x in leaves])
    for g_ref, g_chk in zip(*grads):
        assert rel_err(g_chk, g_ref) < TOL[dtype]


def test_state_splits_sequence():
    q, k, v, lg, s0 = recurrence_inputs(1, 50, 2, 4, 4, torch.float64)
    o, S = recurrence_chunked(q, k, v, lg, s0, chunk_size=8)
    oa, Sa = recurrence_chunked(q[:, :21], k[:, :21], v[:, :21], lg[:, :21], s0, chunk_size=8)
    ob, Sb = recurrence_chunked(q[:, 21:], k[:, 21:], v[:, 21:], lg[:, 21:], Sa, chunk_size=8)
    assert rel_err(torch.cat([oa, ob], 1), o) < 1e-12 and rel_err(Sb, S) < 1e-12


def attention_loop(q, k, v, q_pos0, k_pos0, window):
    """One query at a time, plain Python masking: an independent attention reference."""
    B, Hq, Tq, D = q.shape
    rep = Hq // k.shape[1]
    out = torch.zeros_like(q)
    for h in range(Hq):
        kh, vh = k[:, h // rep], v[:, h // rep]
        for i in range(Tq):
            pq = q_pos0 + i
            keys = [j for j in range(k.shape[2])
                    if 0 <= pq - (k_pos0 + j) and (window is None or pq - (k_pos0 + j) < window)]
            s = (q[:, h, i, None, :] * kh[:, keys]).sum(-1) / math.sqrt(D)
            out[:, h, i] = (s.softmax(-1)[..., None] * vh[:, keys]).sum(1)
    return out


@pytest.mark.parametrize("Tq,Tk,q_pos0,k_pos0,window,hq,hkv", [
    (9, 9, 0, 0, None, 4, 4), (9, 9, 0, 0, 3, 4, 2), (1, 12, 11, 0, None, 2, 1),
    (5, 8, 10, 7, 4, 4, 2), (1, 1, 0, 0, 1, 2, 2), (17, 17, 0, 0, 5, 3, 1)])
@pytest.mark.parametrize("fn", [attention_reference, attention_sdpa])
def test_attention_backends_match_loop(Tq, Tk, q_pos0, k_pos0, window, hq, hkv, fn):
    q = torch.randn(2, hq, Tq, 8, dtype=torch.float64)
    k = torch.randn(2, hkv, Tk, 8, dtype=torch.float64)
    v = torch.randn(2, hkv, Tk, 8, dtype=torch.float64)
    ref = attention_loop(q, k, v, q_pos0, k_pos0, window)
    out = fn(q, k, v, q_pos0=q_pos0, k_pos0=k_pos0, window=window)
    assert rel_err(out, ref) < 1e-10


def test_kernel_registry_choices_and_errors():
    from composer.core.errors import HycompError
    from composer.core.kernels import op, use_kernels
    from composer.core.registry import resolve_backend
    cpu = torch.device("cpu")
    assert resolve_backend("gated_linear_recurrence", "auto", cpu, torch.float32).name == "chunked"
    assert resolve_backend("attention", "auto", cpu, torch.float32).name == "sdpa"
    with pytest.raises(HycompError) as ei:
        resolve_backend("attention", "triton_v9", cpu, torch.float32)
    assert "kernels.attention" in ei.value.render()
    q, lg = torch.randn(1, 3, 2, 4, dtype=torch.float64), -torch.rand(1, 3, 2, dtype=torch.float64)
    with use_kernels({"gated_linear_recurrence": "reference"}):
        o_ref, _ = op("gated_linear_recurrence")(q, q, q, lg)
    o_auto, _ = op("gated_linear_recurrence")(q, q, q, lg)
    assert rel_err(o_auto, o_ref) < 1e-12
    assert rel_err(o_ref, recurrence_reference(q, q, q, lg)[0]) == 0
