"""Generation: KV caches, prefill + decode against the whole-sequence forward, ragged batches,
sampling.

The decode path runs under ``torch.no_grad`` and writes caches in place, a different code path
from the out-of-place one the block tests exercise with autograd on; everything here runs
without grad, as generation does.
"""
import math

import pytest
import torch

import composer
from blocks.common import KVCache
from composer.build.generation import (Generation, Sampling, choose, position_limit,
                                       reserve_caches, warp_logits)
from composer.core.block import state_nbytes
from composer.core.registry import block_types
from helpers import recipe_from, rel_err

from cases import all_cases

D = 32
SPECS = all_cases()
PACKAGED = ["gemma3_tiny", "hybrid_small", "hymba_tiny", "jamba_tiny", "minimax01_tiny",
            "multilevel_tiny", "nemotron_h_tiny", "qwen3_next_tiny", "recurrentgemma_tiny",
            "samba_tiny", "zamba_tiny"]

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


def block(name, dtype=torch.float32):
    raw = dict(SPECS[name])
    kind = raw.pop("kind", name)
    bt = block_types()[kind]
    torch.manual_seed(1)
    return bt.module(bt.spec(kind=kind, **raw), D).to(dtype)


def block_model(name, n_layers=2):
    """A model of ``n_layers`` sub-layers of the block case ``name`` (vocab 256)."""
    raw = dict(SPECS[name])
    raw.setdefault("kind", name)
    recipe = recipe_from({"d_model": D, "n_layers": None, "ffn": None, "vocab_size": 256,
                          "max_seq_len": 512, "blocks": {"b": raw},
                          "schedule": {"layers": ["b"] * n_layers}})
    torch.manual_seed(2)
    return composer.build_model(recipe).eval()


def packaged_model(name):
    recipe = composer.load_recipe("config", overrides=[f"model={name}"])
    torch.manual_seed(3)
    return composer.build_model(recipe).eval()


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------
def kept_positions(kind, ring, limit, end):
    stop = end if limit is None else min(end, limit)
    first = {"window": max(0, stop - (ring or 0)),
             "block": (stop - 1) // ring * ring if ring and stop else 0}.get(kind, 0)
    return list(range(first, stop))


@pytest.mark.parametrize("kind,ring,limit", [("global", None, None), ("global", None, 5),
                                             ("window", 4, None), ("block", 3, None)])
@pytest.mark.parametrize("grad", [False, True])
def test_kv_cache_keeps_exactly_the_positions_it_should(kind, ring, limit, grad):
    """Random write sizes; after each write ``ordered`` returns the kept positions' keys in
    position order, the buffers never exceed the ring or the limit, ``all_slots`` holds the
    same set. With grad on (and keys that require it) the out-of-place path runs."""
    g = torch.Generator().manual_seed(hash((kind, ring, limit)) % 1000)
    keys = torch.randn(2, 3, 40, 4, generator=g)
    c = KVCache.empty(2, 3, 4, "cpu", torch.float32, kind, ring, limit)
    pos = 0
    with torch.set_grad_enabled(grad):
        while pos < 40:
            T = int(torch.randint(1, 7, (1,), generator=g))
            T = min(T, 40 - pos)
            k = keys[:, :, pos:pos + T].clone().requires_grad_(grad)
            c = c.write(k, -k)
            pos += T
            want = kept_positions(kind, ring, limit, pos)
            assert c.pos == pos and c.held() == len(want)
            ok, ov = c.ordered(len(want))
            assert torch.equal(ok.detach(), keys[:, :, want])
            assert torch.equal(ov.detach(), -keys[:, :, want])
            bound = ring or limit
            if bound is not None:
                assert c.k.shape[2] <= bound
            ak, _ = c.all_slots()
            assert sorted(ak.detach()[0, 0, :, 0].tolist()) == sorted(keys[0, 0, want, 0].tolist())


def test_global_cache_reserved_once_is_never_reallocated():
    c = KVCache.empty(1, 2, 4, "cpu", torch.float32)
    c.reserve(30)
    buf = c.k.data_ptr()
    for _ in range(30):
        c = c.write(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert c.k.data_ptr() == buf and c.k.shape[2] == 30
    c = c.write(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))   # past it: doubles
    assert c.k.shape[2] == 60 and c.held() == 31


def test_global_cache_branches_copy_on_write_and_rings_refuse_stale_use():
    k = torch.randn(1, 1, 6, 2)
    base = KVCache.empty(1, 1, 2, "cpu", torch.float32).write(k[:, :, :4], k[:, :, :4])
    a = base.write(k[:, :, 4:5], k[:, :, 4:5])
    b = base.write(k[:, :, 5:6], k[:, :, 5:6])        # branch from the older object
    assert torch.equal(a.ordered(5)[0], k[:, :, :5])
    assert torch.equal(b.ordered(5)[0], torch.cat([k[:, :, :4], k[:, :, 5:6]], 2))
    ring = KVCache.empty(1, 1, 2, "cpu", torch.float32, "window", 3).write(k, k)
    fork = ring.copy()
    ring.write(k[:, :, :1], k[:, :, :1])
    with pytest.raises(RuntimeError, match="copy"):
        ring.ordered(2)
    assert torch.equal(fork.ordered(3)[0], k[:, :, 3:])


def test_sliding_window_cache_never_holds_more_than_w_positions():
    blk = block("attention_window")                           # window 5
    st = blk.init_state(2, "cpu", torch.float32)
    st.reserve(1000)
    for t in range(30):
        _, st = blk.step(torch.randn(2, D), st)
        assert st.k.shape[2] <= 5 and st.held() == min(t + 1, 5)


# --------------------------------------------------------------------------------------------
# Every block: prefill chunks + decode steps == whole sequence, with in-place caches
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("chunks", [(1,), (5, 7), (11,), (3, 1, 4)])
def test_block_prefill_then_decode_equals_forward(name, chunks):
    blk = block(name)
    T = 19
    x = torch.randn(2, T, D)
    y = blk(x)[0]
    st = blk.init_state(2, x.device, x.dtype)
    reserve_caches(st, T)
    out, a = [], 0
    for n in chunks:                                           # prefill in chunks
        ya, st = blk(x[:, a:a + n], st)
        out.append(ya)
        a += n
    while a < T:                                               # then one token at a time
        yt, st = blk.step(x[:, a], st)
        out.append(yt[:, None])
        a += 1
    assert rel_err(torch.cat(out, 1), y) < 1e-4


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("T", [1, 9, 40])
def test_cache_bytes_equal_the_layer_graph_state_bytes(name, T):
    """A cache sized for T tokens occupies what the cost model says (routed: at most, a path
    holds only the tokens routed to it; block_attention: at most, b slots once T >= b)."""
    blk = block(name)
    st = blk.init_state(1, "cpu", torch.float32)
    reserve_caches(st, T)
    x = torch.randn(1, T, D)
    _, st = blk(x[:, :T // 2], st) if T > 1 else (None, st)
    for t in range(T // 2 if T > 1 else 0, T):
        _, st = blk.step(x[:, t], st)
    want = type(blk).state_bytes(blk.spec, D, T, 4)
    if blk.spec.kind == "routed":
        assert state_nbytes(st) <= want
    else:
        assert state_nbytes(st) == want, name


# --------------------------------------------------------------------------------------------
# Models: every block family and the packaged hybrids
# --------------------------------------------------------------------------------------------
def _prefill_decode_logits(model, ids, split, chunk):
    cache = model.init_cache(ids.shape[0], capacity=ids.shape[1])
    rows = [model.prefill(ids[:, :split], cache, chunk_size=chunk)]
    for t in range(split, ids.shape[1] - 1):
        rows.append(model.decode_step(ids[:, t], cache))
    return torch.stack(rows, 1), cache


@pytest.mark.parametrize("name", sorted(SPECS))
def test_model_of_each_block_prefill_decode_equals_forward(name):
    model = block_model(name)
    ids = torch.randint(0, 256, (2, 21))
    full = model(ids)
    got, cache = _prefill_decode_logits(model, ids, split=8, chunk=3)
    assert rel_err(got, full[:, 7:20]) < 1e-4
    # prefill in chunks == prefill in one
    one = model.prefill(ids[:, :13], model.init_cache(2))
    chunked = model.prefill(ids[:, :13], model.init_cache(2), chunk_size=4)
    assert rel_err(chunked, one) < 1e-5 and rel_err(one, full[:, 12]) < 1e-4


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_recipe_prefill_decode_equals_forward(name):
    model = packaged_model(name)
    ids = torch.randint(0, model.embed.num_embeddings, (2, 23))
    full = model(ids)
    got, cache = _prefill_decode_logits(model, ids, split=9, chunk=4)
    assert rel_err(got, full[:, 8:22]) < 1e-4
    # the cache holds what the layer graph's cost model says, node by node
    per_node = cache.node_bytes()
    for nid, a in model.graph.nodes(data=True):
        if nid in per_node and a["op"] in ("residual", "branch") and a["kind"] != "routed":
            assert per_node[nid] == 2 * a["state_bytes"](23, 4), (name, nid)   # batch 2


@pytest.mark.parametrize("name", sorted(SPECS))
def test_ragged_batch_greedy_equals_each_prompt_alone(name):
    """Prompts of 2, 7 and 4 tokens in one batch give the tokens each gives alone."""
    model = block_model(name, n_layers=1).double()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (2, 7, 4)]
    together = Generation(model, prompts, 5).run().new_tokens
    alone = [Generation(model, [p], 5).run().new_tokens[0] for p in prompts]
    assert together == alone and all(len(t) == 5 for t in alone)


def test_generate_takes_hugging_face_arguments_and_left_padding():
    model = block_model("mamba2").double()
    g = torch.Generator().manual_seed(5)
    a = torch.randint(1, 256, (4,), generator=g)
    b = torch.randint(1, 256, (7,), generator=g)
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0, 3:], ids[1] = a, b                                  # left-padded
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    out = model.generate(ids, max_new_tokens=6, attention_mask=mask)
    assert out.shape == (2, 13) and torch.equal(out[:, :7], ids)
    alone = model.generate(a[None], max_new_tokens=6)
    assert torch.equal(out[0, 7:], alone[0, 4:])
    # greedy decoding is the argmax of the forward's last logits, step by step
    seq = b[None]
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out[1, 7:], seq[0, 7:])


def test_eos_stops_a_row_and_pads_it():
    model = block_model("mamba2")
    ids = torch.randint(0, 256, (2, 5))
    free = model.generate(ids, max_new_tokens=8)
    eos = int(free[0, 7])                      # row 0's third new token
    out = model.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=999)
    row0 = out[0, 5:].tolist()
    stop = row0.index(eos)
    assert stop <= 2 and all(t == 999 for t in row0[stop + 1:])
    if eos not in free[1, 5:].tolist():        # a row that never meets eos runs to the end
        assert out.shape[1] == 13 and torch.equal(out[1], free[1])


def test_position_limit_only_for_growing_caches():
    glob = block_model("attention")
    assert position_limit(glob) == 512
    with pytest.raises(ValueError, match="max_seq_len"):
        glob.generate(torch.randint(0, 256, (1, 500)), max_new_tokens=20)
    assert position_limit(block_model("attention_window")) is None
    assert position_limit(block_model("mamba2")) is None


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def test_top_k_keeps_exactly_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, -2.0, 4.0]])
    kept = torch.isfinite(warp_logits(logits, Sampling(True, 1.0, 3, 1.0)))
    assert kept.tolist() == [[False, True, True, True, False, True]]   # 5, 4, and both 3s
    kept = torch.isfinite(warp_logits(logits, Sampling(True, 1.0, 0, 1.0)))
    assert kept.all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.2, 0.25]])
    logits = probs.log()
    for p, want in [(0.5, [1]), (0.51, [1, 3]), (0.75, [1, 3]), (0.76, [1, 2, 3]),
                    (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3]), (1e-9, [1])]:
        kept = torch.isfinite(warp_logits(logits, Sampling(True, 1.0, 0, p)))[0]
        assert kept.nonzero()[:, 0].tolist() == want, p


def test_temperature_scales_before_the_filters():
    logits = torch.randn(3, 50)
    out = warp_logits(logits, Sampling(True, 0.5, 0, 1.0))
    assert torch.allclose(out, logits / 0.5)
    assert torch.equal(choose(logits, Sampling(True, 0.0)), logits.argmax(-1))   # 0: greedy


def test_sampling_draws_follow_the_filtered_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    s = Sampling(True, 1.0, 2, 1.0)
    draws = choose(logits, s, g)
    assert set(draws.tolist()) == {2, 3}
    share = (draws == 3).float().mean().item()
    assert abs(share - 1 / (1 + math.exp(-1))) < 0.02


def test_seeded_sampling_is_reproducible():
    model = block_model("gated_deltanet")
    ids = torch.randint(0, 256, (2, 6))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0)
    a = model.generate(ids, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(ids, generator=torch.Generator().manual_seed(7), **kw)
    c = model.generate(ids, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(top_k=-1), dict(temperature=float("nan"))])
def test_out_of_range_sampling_settings_are_refused(bad):
    s = Sampling(**{"do_sample": True, **bad})
    assert [p[0] for p in s.problems()] == list(bad)
    with pytest.raises(ValueError, match=list(bad)[0]):
        block_model("mlp").generate(torch.randint(0, 256, (1, 3)), 2, do_sample=True, **bad)
