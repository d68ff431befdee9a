"""Op ``attention``: every backend against an independent per-query loop; chunked == reference
on outputs and gradients; the blocks of the family on the banded path; ``auto`` dispatch."""
import math

import pytest
import torch

from composer.core.block import state_nbytes

import blocks.ops.attention._common as attn_op
import blocks.ops.attention.sdpa as sdpa_op
from blocks.ops.attention.chunked import attention_chunked
from blocks.ops.attention.reference import attention_reference
from blocks.ops.attention.sdpa import attention_sdpa
from composer.core.kernels import use_kernels
from composer.core.registry import block_types, resolve_backend

from helpers import rel_err

BACKENDS = [attention_reference, attention_chunked, attention_sdpa]


def loop_attention(q, k, v, q_pos0=0, k_pos0=0, window=None, block_size=None,
                   k_global=None, v_global=None, scale=None):
    """One query at a time, keys picked by plain Python conditions on positions."""
    B, Hq, Tq, D = q.shape
    rep = Hq // k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    G = 0 if k_global is None else k_global.shape[2]
    out = torch.zeros_like(q)
    for h in range(Hq):
        kh, vh = k[:, h // rep], v[:, h // rep]
        for i in range(Tq):
            pq = q_pos0 + i
            local = [j for j in range(k.shape[2])
                     if 0 <= pq - (k_pos0 + j)
                     and (window is None or pq - (k_pos0 + j) < window)
                     and (block_size is None or pq // block_size == (k_pos0 + j) // block_size)]
            far = [g for g in range(G) if g <= pq - window]
            keys = torch.cat([kh[:, local]] + ([k_global[:, h // rep, far]] if far else []), 1)
            vals = torch.cat([vh[:, local]] + ([v_global[:, h // rep, far]] if far else []), 1)
            if keys.shape[1] == 0:
                continue
            s = (q[:, h, i, None, :] * keys).sum(-1) * scale
            out[:, h, i] = (s.softmax(-1)[..., None] * vals).sum(1)
    return out


def inputs(Tq, Tk, hq, hkv, dtype, G=0, B=2, D=8, grad=False):
    make = lambda *s: torch.randn(*s, dtype=dtype).requires_grad_(grad)  # noqa: E731
    q, k, v = make(B, hq, Tq, D), make(B, hkv, Tk, D), make(B, hkv, Tk, D)
    g = {"k_global": make(B, hkv, G, D), "v_global": make(B, hkv, G, D)} if G else {}
    return q, k, v, g


# (Tq, Tk, q_pos0, k_pos0, window, hq, hkv): offsets as a KV cache leaves them, T = 1, windows
# 1 and 3, a window longer than T, T not a multiple of the chunk, a few hundred tokens
WINDOWED = [
    (9, 9, 0, 0, 3, 4, 2), (1, 1, 0, 0, 1, 2, 2), (1, 5, 20, 16, 5, 2, 1),
    (150, 150, 0, 0, 1, 2, 2), (150, 150, 0, 0, 3, 4, 1), (70, 70, 0, 0, 100, 2, 1),
    (130, 134, 40, 36, 5, 4, 2), (300, 300, 0, 0, 97, 2, 1), (200, 263, 500, 437, 64, 2, 2),
    (65, 65, 0, 0, 130, 3, 3), (40, 40, 0, 0, None, 4, 2), (5, 17, 12, 0, None, 2, 1)]


@pytest.mark.parametrize("Tq,Tk,q_pos0,k_pos0,window,hq,hkv", WINDOWED)
@pytest.mark.parametrize("fn", BACKENDS, ids=lambda f: f.__name__)
def test_windowed_backends_match_loop_float64(Tq, Tk, q_pos0, k_pos0, window, hq, hkv, fn):
    q, k, v, _ = inputs(Tq, Tk, hq, hkv, torch.float64)
    ref = loop_attention(q, k, v, q_pos0, k_pos0, window)
    assert rel_err(fn(q, k, v, q_pos0=q_pos0, k_pos0=k_pos0, window=window), ref) < 1e-10


# (Tq, Tk, q_pos0, k_pos0, block_size, hq, hkv): block-local, from a block boundary or inside
BLOCKS = [(24, 24, 0, 0, 5, 4, 2), (1, 3, 18, 16, 8, 2, 1), (37, 40, 100, 97, 10, 2, 2),
          (200, 200, 0, 0, 16, 2, 1), (150, 151, 64, 63, 1, 2, 2), (30, 30, 0, 0, 64, 4, 4)]


@pytest.mark.parametrize("Tq,Tk,q_pos0,k_pos0,block_size,hq,hkv", BLOCKS)
@pytest.mark.parametrize("fn", BACKENDS, ids=lambda f: f.__name__)
def test_block_local_backends_match_loop_float64(Tq, Tk, q_pos0, k_pos0, block_size, hq, hkv,
                                                 fn):
    q, k, v, _ = inputs(Tq, Tk, hq, hkv, torch.float64)
    ref = loop_attention(q, k, v, q_pos0, k_pos0, block_size=block_size)
    out = fn(q, k, v, q_pos0=q_pos0, k_pos0=k_pos0, block_size=block_size)
    assert rel_err(out, ref) < 1e-10


# (Tq, Tk, q_pos0, k_pos0, window, G, hq, hkv): global tokens + window, fresh or cached
SPARSE = [(30, 30, 0, 0, 4, 3, 4, 2), (1, 5, 40, 36, 6, 2, 2, 1), (200, 200, 0, 0, 9, 4, 2, 2),
          (150, 156, 70, 64, 7, 1, 2, 1), (20, 20, 0, 0, 40, 5, 2, 2)]


@pytest.mark.parametrize("Tq,Tk,q_pos0,k_pos0,window,G,hq,hkv", SPARSE)
@pytest.mark.parametrize("fn", BACKENDS, ids=lambda f: f.__name__)
def test_sparse_backends_match_loop_float64(Tq, Tk, q_pos0, k_pos0, window, G, hq, hkv, fn):
    q, k, v, g = inputs(Tq, Tk, hq, hkv, torch.float64, G=G)
    ref = loop_attention(q, k, v, q_pos0, k_pos0, window, **g)
    assert rel_err(fn(q, k, v, q_pos0=q_pos0, k_pos0=k_pos0, window=window, **g), ref) < 1e-10


MASKS = [dict(window=5), dict(window=70), dict(block_size=12), dict(window=8, G=3),
         dict(window=4, q_pos0=33, k_pos0=30)]


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_chunked_matches_reference_float32(mask):
    mask = dict(mask)
    G = mask.pop("G", 0)
    q, k, v, g = inputs(257, 257, 4, 2, torch.float32, G=G, D=16)
    out = attention_chunked(q, k, v, **mask, **g)
    ref = attention_reference(q.double(), k.double(), v.double(), **mask,
                              **{n: t.double() for n, t in g.items()})
    assert rel_err(out, ref.float()) < 1e-4


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_chunked_gradients_match_reference_float64(mask):
    mask = dict(mask)
    G = mask.pop("G", 0)
    q, k, v, g = inputs(140, 140, 4, 2, torch.float64, G=G, grad=True)
    leaves = [q, k, v, *g.values()]
    w = torch.randn(2, 4, 140, 8, dtype=torch.float64)
    grads = []
    for fn in (attention_chunked, attention_reference):
        (fn(q, k, v, scale=0.3, **mask, **g) * w).sum().backward()
        grads.append([t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-10


def test_a_query_that_sees_no_key_gives_zero():
    q, k, v, _ = inputs(4, 3, 2, 2, torch.float64)
    for fn in BACKENDS:  # the keys sit after the queries, or too far before them
        assert fn(q, k, v, q_pos0=0, k_pos0=10, window=3).abs().max() == 0
        assert fn(q, k, v, q_pos0=50, k_pos0=0, window=3).abs().max() == 0


def test_global_keys_need_a_window():
    q, k, v, g = inputs(4, 4, 2, 2, torch.float64, G=2)
    for fn in BACKENDS:
        with pytest.raises(ValueError, match="window"):
            fn(q, k, v, **g)


def test_auto_runs_sdpa_dense_when_short_and_banded_when_long(monkeypatch):
    assert resolve_backend("attention", "auto", torch.device("cpu"), torch.float32).name == "sdpa"
    calls = []
    real = sdpa_op.banded
    monkeypatch.setattr(sdpa_op, "banded",
                        lambda *a: calls.append(a[0].shape[2]) or real(*a))
    for T in (100, 600):
        q, k, v, _ = inputs(T, T, 2, 1, torch.float32)
        attention_sdpa(q, k, v, window=16)
        attention_sdpa(q, k, v)
    assert calls == [600]  # global attention and short sequences stay one dense call


# blocks of the family on the banded path: long sequences, split across calls
FAMILY = {"attention": dict(n_heads=4, n_kv_heads=2, window=7, qk_norm="rms",
                            output_gate=True),
          "block_attention": dict(n_heads=2, block_size=9, rope_fraction=0.5),
          "sparse_attention": dict(n_heads=4, n_kv_heads=1, window=6, n_global=3)}


@pytest.mark.parametrize("kind", FAMILY)
def test_blocks_on_the_chunked_path_match_reference(kind):
    bt = block_types()[kind]
    blk = bt.module(bt.spec(**FAMILY[kind]), 32).double()
    x = torch.randn(2, 300, 32, dtype=torch.float64)
    with use_kernels({"attention": "reference"}):
        ref, _ = blk(x)
    with use_kernels({"attention": "chunked"}):
        y, _ = blk(x)
        ya, st = blk(x[:, :139], blk.init_state(2, x.device, x.dtype))
        yb, _ = blk(x[:, 139:], st)
    assert rel_err(y, ref) < 1e-10
    assert rel_err(torch.cat([ya, yb], 1), ref) < 1e-10


@pytest.mark.parametrize("kind", FAMILY)
@pytest.mark.parametrize("T", [1, 5, 40, 203])
def test_flops_count_exactly_the_visible_pairs(kind, T):
    bt = block_types()[kind]
    spec = bt.spec(**FAMILY[kind])
    blk = bt.module(spec, 32)
    mask = attn_op.visible(T, T, 0, 0, getattr(spec, "window", None), "cpu",
                           getattr(spec, "block_size", None))
    pairs = mask.sum().item()
    if kind == "sparse_attention":
        pairs += attn_op.global_visible(T, spec.n_global, 0, spec.window, "cpu").sum().item()
    proj = bt.module.projection_flops(spec, 32)
    per_pair = 4 * blk.hq * blk.hd  # q.k and p.v, 2 FLOPs per multiply-add
    assert bt.module.flops_per_token(spec, 32, T) == pytest.approx(proj + per_pair * pairs / T)


@pytest.mark.parametrize("kind", FAMILY)
@pytest.mark.parametrize("T", [3, 16])
def test_state_bytes_bound_the_real_cache(kind, T):
    bt = block_types()[kind]
    blk = bt.module(bt.spec(**FAMILY[kind]), 32)
    st = blk.init_state(1, "cpu", torch.float32)
    peak = 0
    for _ in range(T):
        _, st = blk.step(torch.randn(1, 32), st)
        peak = max(peak, state_nbytes(st))
    assert bt.module.state_bytes(blk.spec, 32, T, 4) == peak


@pytest.mark.parametrize("Tq,Tk,hq,hkv", [(5, 12, 4, 2), (7, 8, 2, 1), (33, 100, 4, 4),
                                          (2, 3, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prefill_chunk_after_a_cache_splits_prefix_and_chunk(Tq, Tk, hq, hkv, dtype,
                                                              monkeypatch):
    """Without autograd, a chunk of queries at the last Tq of Tk positions runs as an unmasked
    call over the cached prefix plus a causal one over the chunk, merged by log-sum-exp; it
    must equal the per-query loop (GQA, batch 2) and must actually have run."""
    calls = []
    real = attn_op._cached_prefix_then_causal
    monkeypatch.setattr(attn_op, "_cached_prefix_then_causal",
                        lambda *a: calls.append(1) or real(*a))
    q = torch.randn(2, hq, Tq, 16, dtype=dtype)
    k, v = torch.randn(2, hkv, Tk, 16, dtype=dtype), torch.randn(2, hkv, Tk, 16, dtype=dtype)
    with torch.no_grad():
        got = attention_sdpa(q, k, v, q_pos0=Tk - Tq + 4, k_pos0=4, scale=0.3)
    want = loop_attention(q.double(), k.double(), v.double(), q_pos0=Tk - Tq + 4, k_pos0=4,
                          scale=0.3)
    assert calls and got.dtype == dtype
    assert rel_err(got.double(), want) < (1e-12 if dtype == torch.float64 else 1e-5)
