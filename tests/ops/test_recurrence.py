"""Vector gates, G = 1, shared q/k heads and the diagonal shapes (Mamba-1, RG-LRU) with their
``scan`` backend: reference == an independent closed form, chunked and scan == reference on
outputs, final states and gradients, extreme gates included (scalar-gate outputs:
tests/ops/test_scalar_and_attention.py)."""
import math

import pytest
import torch

from blocks.ops.recurrence.chunked import recurrence_chunked
from blocks.ops.recurrence.reference import recurrence_reference
from blocks.ops.recurrence.scan import recurrence_scan, recurrence_scan_recompute

from helpers import rel_err
from scan_helpers import GATES, call, grads, matches_reference, saved_bytes, scan_inputs

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 45])
@pytest.mark.parametrize("gate", ["normal", "near0", "near1"])
@pytest.mark.parametrize("per", ["key_dim", "head"])
def test_chunked_gradients_match_reference_for_extreme_gates(dtype, T, gate, per):
    """Vector and scalar gates; the log-gate gradient stays accurate where exp(.) is tiny."""
    args = vector_inputs(2, T, 2, 8, 3, dtype, gate)
    if per == "head":
        args = args[:3] + (args[3][..., 0],) + args[4:]
    ref = grads(recurrence_reference, args, T)
    chk = grads(lambda *a: recurrence_chunked(*a, chunk_size=32), args, T)
    for name, g_ref, g_chk in zip("q k v log_g state".split(), ref, chk):
        assert rel_err(g_chk, g_ref) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,chunk", [(1, 16), (2, 2), (7, 4), (16, 16), (17, 16), (70, 8),
                                     (129, 32)])
@pytest.mark.parametrize("gate", ["normal", "near0", "zero"])
def test_vector_gradients_every_halving_level(monkeypatch, dtype, T, chunk, gate):
    """The halving form's hand-written backward (forced for every gate here): chunks of 1 to
    16 tokens (every halving level, the 2-token blocks that skip the matmul included), T below,
    at and past a chunk, q and k shared by groups of 2 heads; every input's gradient and the
    initial state's."""
    import blocks.ops.recurrence.chunked as rec
    monkeypatch.setattr(rec, "NARROW_SPAN", -1.0)      # no chunk qualifies: always halving
    q, k, v, lg, s0 = vector_inputs(2, T, 4, 8, 3, dtype, gate)
    args = (q[:, :, :2], k[:, :, :2], v, lg, s0)
    ref = grads(recurrence_reference, args, T)
    got = grads(lambda *a: recurrence_chunked(*a, chunk_size=chunk), args, T)
    for name, g_ref, g_got in zip("q k v log_g state".split(), ref, got):
        assert torch.isfinite(g_got).all() and rel_err(g_got, g_ref) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,chunk", [(1, 64), (7, 4), (16, 16), (17, 16), (70, 8), (129, 64),
                                     (100, 1), (45, 45)])
@pytest.mark.parametrize("gate", ["normal", "near1", "span"])
@pytest.mark.parametrize("per", ["key_dim", "head"])
def test_narrow_form(monkeypatch, dtype, T, chunk, gate, per):
    """Chunks decaying at most NARROW_SPAN take the one-matmul form (checked to be the one
    that runs), vector gates (q and k shared by groups of 2 heads) and scalar gates (q and k
    per head): outputs, state and every gradient equal the reference. ``span``: log gates
    making each chunk decay by 98-100% of the limit, where the key factors reach exp(40)."""
    from blocks.ops.recurrence import chunked as rec
    q, k, v, lg, s0 = vector_inputs(2, T, 4, 8, 3, dtype, "normal" if gate == "span" else gate)
    C = max(1, min(chunk, T))
    if gate == "span":
        lg = -0.999 * rec.NARROW_SPAN / C * (1 - 0.02 * torch.rand_like(lg))
    if per == "head":
        lg = lg[..., 0]
    assert rec._decays_within(lg, C, rec.NARROW_SPAN)
    calls = []
    monkeypatch.setattr(rec._NarrowChunked, "apply",
                        lambda *a, _f=rec._NarrowChunked.apply: calls.append(1) or _f(*a))
    args = (q[:, :, :2], k[:, :, :2], v, lg, s0) if per == "key_dim" else (q, k, v, lg, s0)
    o1, S1 = recurrence_reference(*args)
    o2, S2 = recurrence_chunked(*args, chunk_size=chunk)
    assert rel_err(o2, o1) < TOL[dtype] and rel_err(S2, S1) < TOL[dtype]
    ref = grads(recurrence_reference, args, T)
    got = grads(lambda *a: recurrence_chunked(*a, chunk_size=chunk), args, T)
    for name, g_ref, g_got in zip("q k v log_g state".split(), ref, got):
        assert torch.isfinite(g_got).all() and rel_err(g_got, g_ref) < TOL[dtype], name
    assert calls


@pytest.mark.parametrize("per", ["key_dim", "head", "head_expanded"])
def test_narrow_form_reads_views_and_returns_gradients_in_the_callers_layout(per):
    """Without padding the one-matmul form takes q, k and the gates as head-major views of the
    (B, T, H, X) inputs: results equal the reference, and the gradients of q, k and the gates
    arrive contiguous in that layout (written in place, not transposed back by a copy). An
    expanded gate (a fixed decay per head, as RetNet passes it) gets a dense gradient."""
    B, T, H, K, V = 2, 32, 3, 8, 5
    q, k, v, lg, s0 = vector_inputs(B, T, H, K, V, torch.float64, "near1")
    if per != "key_dim":
        lg = lg[..., 0]
    if per == "head_expanded":
        lg = lg[:1, :1].expand(B, T, H)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, lg, s0)]
    seen = {}                                  # the gradients as the op hands them back
    inner = [x * 1 for x in leaves]
    for i in (0, 1, 3):
        inner[i].register_hook(lambda gr, i=i: seen.__setitem__(i, gr))
    o, S = recurrence_chunked(*inner, chunk_size=16)
    o1, S1 = recurrence_reference(q, k, v, lg, s0)
    assert rel_err(o, o1) < 1e-10 and rel_err(S, S1) < 1e-10
    g = torch.Generator().manual_seed(3)
    ((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
     + (S * torch.randn(S.shape, generator=g, dtype=S.dtype)).sum()).backward()
    ref = grads(recurrence_reference, (q, k, v, lg, s0), 3)
    for name, x, g_ref in zip("q k v log_g state".split(), leaves, ref):
        assert rel_err(x.grad, g_ref) < 1e-10, name
    assert seen[0].is_contiguous() and seen[1].is_contiguous()
    assert seen[3].is_contiguous() or per == "head_expanded"


@pytest.mark.parametrize("per", ["key_dim", "head"])
def test_narrow_form_with_shared_q_and_k(per):
    """The one-matmul form itself takes q and k shared by the heads of a group (the chunked
    backend sends such scalar-gate calls to the decay-matrix form instead), sums their
    gradients over the group, and equals the reference."""
    from blocks.ops.recurrence import chunked as rec
    B, T, C, Hk, h, K, V = 2, 48, 16, 2, 3, 4, 5
    q, k, v, lg, s0 = vector_inputs(B, T, Hk * h, K, V, torch.float64)
    q, k = q[:, :, :Hk], k[:, :, :Hk]
    lg = lg if per == "key_dim" else lg[..., :1]

    def narrow(q, k, v, lg, s0):
        n = T // C
        lay = lambda x, g: x.transpose(1, 2).reshape(B, Hk, g, n, C, x.shape[-1])  # noqa: E731
        o, S = rec._NarrowChunked.apply(lay(q, 1), lay(k, 1), lay(v, h), lay(lg, h),
                                        s0.reshape(B, Hk, h, K, V))
        return o.reshape(B, Hk * h, T, V).transpose(1, 2), S.reshape(B, Hk * h, K, V)

    ref_fn = lambda q, k, v, lg, s0: recurrence_reference(  # noqa: E731
        q, k, v, lg if per == "key_dim" else lg[..., 0], s0)
    args = (q, k, v, lg, s0)
    o1, S1 = ref_fn(*args)
    o2, S2 = narrow(*args)
    assert rel_err(o2, o1) < 1e-10 and rel_err(S2, S1) < 1e-10
    for name, g_ref, g_got in zip("q k v log_g state".split(), grads(ref_fn, args, 1),
                                  grads(narrow, args, 1)):
        assert rel_err(g_got, g_ref) < 1e-10, name


def test_vector_form_choice_is_per_call():
    """One chunk decaying past NARROW_SPAN sends the whole call to the halving form, and the
    result still equals the reference."""
    from blocks.ops.recurrence import chunked as rec
    q, k, v, lg, s0 = vector_inputs(1, 80, 2, 4, 3, torch.float64)
    lg = lg / 100
    lg[:, 40] = -60.0                                    # one token decaying to ~1e-26
    assert not rec._decays_within(lg, 16, rec.NARROW_SPAN)
    assert rec._decays_within(lg[:, :32], 16, rec.NARROW_SPAN)
    o1, S1 = recurrence_reference(q, k, v, lg, s0)
    o2, S2 = recurrence_chunked(q, k, v, lg, s0, chunk_size=16)
    assert rel_err(o2, o1) < 1e-10 and rel_err(S2, S1) < 1e-10


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
# Diagonal shapes (V = 1): Mamba-1 and RG-LRU, and the ``scan`` backend that auto picks for them
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["normal", "near0", "near1"])
def test_factored_gate_reference_matches_closed_form(gate):
    """log gate dt * A, q = C and k = B shared by all heads: the closed form of the vector-gate
    recurrence with those expanded (an independent expression, no loop)."""
    q, k, v, dt, s0, A = scan_inputs(2, 30, 1, 6, 4, torch.float64, gate)
    o, S = recurrence_reference(q, k, v, dt, s0, A=A)
    H = v.shape[2]
    o2, S2 = closed_form_vector(q.expand(-1, -1, H, -1), k.expand(-1, -1, H, -1), v,
                                dt[..., None] * A, s0)
    assert rel_err(o, o2) < 1e-10 and rel_err(S, S2) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,chunk", [(1, 16), (15, 16), (33, 16), (300, 64)])
@pytest.mark.parametrize("gate", ["normal", "near0", "near1"])
@pytest.mark.parametrize("form", ["factored", "vector", "scalar", "none"])
@pytest.mark.parametrize("with_state", [True, False])
def test_scan_matches_reference(dtype, T, chunk, gate, form, with_state):
    args = scan_inputs(2, T, 1, 12, 16, dtype, gate, with_state, form)
    o1, S1 = call(recurrence_reference)(*args)
    o2, S2 = call(recurrence_scan, chunk_size=chunk)(*args)
    assert rel_err(o2, o1) < TOL[dtype] and rel_err(S2, S1) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 41])
@pytest.mark.parametrize("gate", ["normal", "near0", "near1"])
@pytest.mark.parametrize("form", ["factored", "vector", "scalar", "none"])
def test_scan_gradients_match_reference(dtype, T, gate, form):
    """Every input, A and the initial state included; q and k shared by groups of 3 heads."""
    args = scan_inputs(2, T, 2, 3, 4, dtype, gate, True, form)
    ref = grads(call(recurrence_reference), args, T)
    got = grads(call(recurrence_scan, chunk_size=8), args, T)
    for name, g_ref, g_got in zip("q k v log_g state A".split(), ref, got):
        if g_ref is not None:
            assert torch.isfinite(g_got).all() and rel_err(g_got, g_ref) < TOL[dtype], name


@pytest.mark.parametrize("form", ["scalar", "vector", "factored"])
def test_k_equals_one(form):
    """K = V = 1 (RG-LRU is the scalar form), a chunk not dividing T."""
    args = scan_inputs(3, 77, 1, 10, 1, torch.float64, "normal", True, form)
    ref = grads(call(recurrence_reference), args, 5)
    got = grads(call(recurrence_scan, chunk_size=9), args, 5)
    assert all(rel_err(b, a) < 1e-10 for a, b in zip(ref, got) if a is not None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,chunk", [(1, 32), (32, 32), (45, 16), (200, 32)])
@pytest.mark.parametrize("gate", ["normal", "near1", "span"])
@pytest.mark.parametrize("form", ["scalar", "vector", "factored", "none"])
@pytest.mark.parametrize("with_state", [True, False])
def test_k_equals_one_prefix_sum_form(monkeypatch, dtype, T, chunk, gate, form, with_state):
    """K = 1 with every chunk decaying at most NARROW_SPAN takes the prefix-sum form (checked
    to be the one that runs): outputs, state and every gradient equal the reference, q and k
    shared by groups of 3 heads. ``span``: each chunk decays by 98-100% of the limit."""
    import blocks.ops.recurrence.scan as scan_mod
    from blocks.ops.recurrence import chunked as rec
    calls = []
    monkeypatch.setattr(scan_mod._NarrowK1, "apply",
                        lambda *a, _f=scan_mod._NarrowK1.apply: calls.append(1) or _f(*a))
    q, k, v, lg, s0, A = scan_inputs(2, T, 2, 3, 1, dtype, "normal" if gate == "span" else gate,
                                     with_state, form)
    if gate == "span" and form != "none":
        C = min(chunk, T)
        per = -0.999 * rec.NARROW_SPAN / C * (1 - 0.02 * torch.rand(lg.shape, dtype=dtype))
        lg, A = (-per, -torch.ones_like(A)) if form == "factored" else (per, None)
    args = (q, k, v, lg, s0, A)
    o1, S1 = call(recurrence_reference)(*args)
    o2, S2 = call(recurrence_scan, chunk_size=chunk)(*args)
    assert rel_err(o2, o1) < TOL[dtype] and rel_err(S2, S1) < TOL[dtype]
    ref = grads(call(recurrence_reference), args, T)
    got = grads(call(recurrence_scan, chunk_size=chunk), args, T)
    for name, g_ref, g_got in zip("q k v log_g state A".split(), ref, got):
        if g_ref is not None:
            assert torch.isfinite(g_got).all() and rel_err(g_got, g_ref) < TOL[dtype], name
    assert calls


def test_k_equals_one_strong_decay_takes_the_steps(monkeypatch):
    """A chunk decaying past NARROW_SPAN sends the call to the stepwise scan, which still
    equals the reference; the choice is per call."""
    import blocks.ops.recurrence.scan as scan_mod
    calls = []
    monkeypatch.setattr(scan_mod._NarrowK1, "apply",
                        lambda *a, _f=scan_mod._NarrowK1.apply: calls.append(1) or _f(*a))
    args = scan_inputs(2, 40, 1, 4, 1, torch.float64, "near0", True, "scalar")
    matches_reference(call(recurrence_scan, chunk_size=16), args, 3)
    assert not calls
    args = scan_inputs(2, 40, 1, 4, 1, torch.float64, "normal", True, "scalar")
    matches_reference(call(recurrence_scan, chunk_size=16), args, 3)
    assert calls


@pytest.mark.parametrize("form", ["factored", "vector"])
def test_scan_in_segments(monkeypatch, form):
    """Long inputs run as segments of whole chunks, the state carried between them: with a
    tiny step budget, 100 tokens in chunks of 8 make several segments (the last one short)."""
    import blocks.ops.recurrence.scan as scan_mod
    monkeypatch.setattr(scan_mod, "STEP_NUMBERS", 2 * 6 * 4 * 3)   # 3 chunks per segment
    args = scan_inputs(2, 100, 2, 3, 4, torch.float64, "normal", True, form)
    matches_reference(call(recurrence_scan, chunk_size=8), args, 9)


def test_mamba_shape_through_the_matmul_form():
    """The ``chunked`` backend takes the factored gate too (materialising it), gradients of A
    included."""
    args = scan_inputs(1, 70, 1, 48, 16, torch.float64)
    matches_reference(call(recurrence_chunked, chunk_size=32), args, 3)


def test_scan_state_splits_sequence():
    q, k, v, dt, s0, A = scan_inputs(2, 50, 1, 5, 4, torch.float64)
    o, S = recurrence_scan(q, k, v, dt, s0, chunk_size=16, A=A)
    a = 21
    oa, Sa = recurrence_scan(q[:, :a], k[:, :a], v[:, :a], dt[:, :a], s0, chunk_size=16, A=A)
    ob, Sb = recurrence_scan(q[:, a:], k[:, a:], v[:, a:], dt[:, a:], Sa, chunk_size=16, A=A)
    assert rel_err(torch.cat([oa, ob], 1), o) < 1e-12 and rel_err(Sb, S) < 1e-12


def test_auto_picks_by_shape():
    """The registry's shape declaration: V = 1 goes to ``scan`` (or, where a C compiler built
    it, to the compiled ``native``: tests/ops/test_native.py), V > 1 to ``chunked``; asking
    for ``scan`` with V > 1 is a clear error."""
    from composer.core.errors import HycompError
    from composer.core.kernels import op, use_kernels
    from composer.core.registry import resolve_backend
    cpu = torch.device("cpu")
    diag = scan_inputs(1, 9, 1, 4, 3, torch.float32)
    wide = vector_inputs(1, 9, 2, 4, 3, torch.float32)

    def pick(args):
        return resolve_backend("gated_linear_recurrence", "auto", cpu, torch.float32,
                               (args, {})).name

    from blocks.ops.recurrence.native import unavailable
    assert pick(diag[:5]) == ("native" if unavailable() is None else "scan")
    assert pick(wide) == "chunked"
    # without a call to look at: the best backend taking every shape
    assert resolve_backend("gated_linear_recurrence", "auto", cpu, torch.float32).name \
        == "chunked"
    with use_kernels({"gated_linear_recurrence": "scan"}):
        with pytest.raises(HycompError) as e:
            op("gated_linear_recurrence")(*wide)
    assert "V = 1" in str(e.value) and "kernels.gated_linear_recurrence=auto" in str(e.value)
    with use_kernels({"gated_linear_recurrence": "auto"}):
        o, _ = op("gated_linear_recurrence")(*diag[:5], A=diag[5])
    o_ref, _ = recurrence_reference(*diag[:5], A=diag[5])
    assert rel_err(o, o_ref) < 1e-5


@pytest.mark.parametrize("backend,form", [
    ("reference", "vector"), ("chunked", "vector"), ("chunked", "scalar"), ("chunked", "none"),
    ("scan", "factored"), ("scan", "scalar"), ("scan_recompute", "factored"),
    ("native", "factored"), ("native", "scalar")])
def test_float32_inside_under_bf16_autocast(backend, form):
    """A bf16 autocast around the op (as training with dtype bf16 puts one) leaves its float32
    products alone: outputs, state and gradients equal those without autocast."""
    from blocks.ops.recurrence.native import recurrence_native, unavailable
    if backend == "native" and unavailable():
        pytest.skip(unavailable())
    fn = {"reference": recurrence_reference, "chunked": recurrence_chunked,
          "scan": recurrence_scan, "scan_recompute": recurrence_scan_recompute,
          "native": recurrence_native}[backend]
    if backend in ("scan", "scan_recompute", "native"):
        args = scan_inputs(2, 37, 1, 6, 4, torch.float32, form=form)
    else:
        q, k, v, lg, s0 = vector_inputs(2, 37, 3, 8, 5, torch.float32)
        args = (q, k, v, {"vector": lg, "scalar": lg[..., 0], "none": None}[form], s0, None)
    res = []
    for on in (False, True):
        leaves = [None if a is None else a.clone().requires_grad_(True) for a in args]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            o, S = call(fn, chunk_size=16)(*leaves)
        (o.square().sum() + S.sum()).backward()
        res.append([o, S] + [x.grad for x in leaves if x is not None])
    for off, on in zip(*res):
        assert on.dtype == torch.float32 and rel_err(on, off) < 1e-6


@pytest.mark.parametrize("form", ["factored", "scalar", "vector"])
def test_scan_recompute_matches_reference(monkeypatch, form):
    """``scan_recompute``: the same results as the reference (outputs, state, every gradient),
    over several segments, each made again in the backward."""
    import blocks.ops.recurrence.scan as scan_mod
    monkeypatch.setattr(scan_mod, "STEP_NUMBERS", 2 * 6 * 4 * 3)   # 3 chunks per segment
    args = scan_inputs(2, 100, 2, 3, 4, torch.float64, "normal", True, form)
    matches_reference(call(recurrence_scan_recompute, chunk_size=8), args, 4)


def test_scan_recompute_keeps_no_gates_or_states():
    """``scan`` keeps its states (T x H x K numbers) for the backward but not its gates (made
    again there from the log gates, a step at a time); ``scan_recompute`` keeps at most its
    inputs."""
    T, H, K = 300, 48, 16
    args = scan_inputs(1, T, 1, H, K, torch.float32)          # Mamba-1: log gate dt * A
    inputs = sum(a.numel() * a.element_size() for a in args if a is not None)
    states = T * H * K * 4
    assert states <= saved_bytes(call(recurrence_scan), args) < states + 2 * inputs
    assert saved_bytes(call(recurrence_scan_recompute), args) <= inputs
