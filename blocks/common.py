"""Helpers that several block modules share; no block module imports another block module.

Holds no registered block (``register_block`` stays in each family's own module):

* spec checks: :func:`heads_problem` (width not split into heads), :func:`window_problem`
  (a local span that never drops a token);
* :func:`causal_conv`: the causal depthwise convolution carried across calls (Mamba, Mamba-2,
  DeltaNet, Gated DeltaNet, RG-LRU);
* RoPE: :func:`rope_cache` and :func:`apply_rope` with its hand-written backward (the softmax
  attention blocks, RetNet);
* norms: :func:`l2norm` (DeltaNet, Gated DeltaNet), :class:`HeadRMSNorm` (qk-norm); RMSNorm
  itself is :mod:`composer.core.norms`, which the model skeleton uses too;
* the softmax-attention core: :class:`SoftmaxAttentionSpec` and :class:`SoftmaxAttention`
  (projections, qk-norm, RoPE, output gate, KV-cache helpers, cost formulas) that the
  ``attention``, ``block_attention`` and ``sparse_attention`` blocks subclass, and
  :func:`mean_visible`;
* the feed-forward core: :class:`MLPSpec` and :class:`FeedForward`, the ``mlp`` block's
  computation, which MoE experts run too;
* token routing: :func:`run_grouped` (sparse dispatch to modules) and :func:`balance_loss`
  (Switch load balance), shared by ``moe`` and ``routed``.

Moving a class here keeps its parameter names: a module's state-dict keys depend on attribute
names, not on the module that defines the class.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from composer.core.block import Block, BlockSpec, accum_dtype, linear_flops
from composer.core.kernels import op
from composer.core.norms import rms_norm


# --------------------------------------------------------------------------------------------
# Spec checks
# --------------------------------------------------------------------------------------------
def heads_problem(d_model: int, n_heads: int, head_dim: int | None) -> list:
    """``problems()`` entries for a width that does not split into heads (empty when it does:
    an explicit head_dim needs no division)."""
    if head_dim is None and d_model % n_heads:
        return [("n_heads", n_heads, f"d_model {d_model} is not divisible by n_heads {n_heads}",
                 "pick n_heads dividing d_model, or set head_dim")]
    return []


def window_problem(field: str, length: int, max_seq_len: int, what: str) -> list:
    """[(field, value, why, fix)] when a local span never drops a token, else []."""
    if length < max_seq_len:
        return []
    return [(field, length, f"the {what} is not shorter than model.max_seq_len {max_seq_len}, so "
            "it never drops a token", f"use a smaller {field}, or the attention block with "
            "window: null for global attention")]


# --------------------------------------------------------------------------------------------
# Causal depthwise convolution
# --------------------------------------------------------------------------------------------
def causal_conv(conv: nn.Conv1d, x: torch.Tensor,
                prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution that continues across calls.

    x (B, T, C) this call's inputs; prev (B, C, k - 1) the last k - 1 inputs before them (zeros
    at the start). Returns the convolution (B, T, C), before any activation, and the new
    ``prev``: the last k - 1 inputs of [prev, x].
    """
    seq = torch.cat([prev.to(x.dtype), x.transpose(1, 2)], dim=-1)        # (B, C, k - 1 + T)
    keep = conv.kernel_size[0] - 1
    if x.shape[1] == 1:
        # one decode step: the window times the taps, summed (conv1d costs ~10x more here)
        y = (seq * conv.weight[:, 0]).sum(-1)                                      # (B, C)
        if conv.bias is not None:
            y = y + conv.bias
        return y[:, None], seq[..., 1:]
    return conv(seq).transpose(1, 2), seq[..., seq.shape[-1] - keep:]


# --------------------------------------------------------------------------------------------
# RoPE (Su et al. 2021), half-split pairing as GPT-NeoX / Llama / Gemma / Qwen
# --------------------------------------------------------------------------------------------
def rope_cache(dim: int, theta: float, positions: torch.Tensor,
               dtype: torch.dtype = torch.float32):
    """cos, sin of shape (T, dim) for RoPE over ``dim`` rotated dims (half-split pairing).

    Angles are computed in float32 (as Hugging Face's rotary modules do), in float64 for float64.
    """
    work = accum_dtype(dtype)
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=work, device=positions.device) / dim)
    ang = positions.to(work)[:, None] * inv[None]                     # (T, dim/2)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


class RopeTable:
    """cos, sin of :func:`rope_cache` for positions 0 .. n-1, computed once and sliced.

    A decode step needs the angles of one position; recomputing them costs ~8 small ops per
    call. The table holds every position seen so far (doubling when a call goes past it) per
    (device, dtype); a slice of it equals :func:`rope_cache` of the same positions exactly
    (the angles are elementwise products of the same integers and inverse frequencies).
    A plain attribute, not a buffer: it is no part of a checkpoint.
    """

    def __init__(self, dim: int, theta: float):
        self.dim, self.theta = dim, theta
        self._tables: dict = {}

    def get(self, pos0: int, T: int, device, dtype: torch.dtype):
        """cos, sin (T, dim) for positions pos0 .. pos0 + T - 1."""
        key = (torch.device(device), dtype)
        cos, sin = self._tables.get(key, (None, None))
        if cos is None or cos.shape[0] < pos0 + T:
            n = max(pos0 + T, 2 * (0 if cos is None else cos.shape[0]), 64)
            cos, sin = rope_cache(self.dim, self.theta, torch.arange(n, device=device), dtype)
            self._tables[key] = (cos, sin)
        return cos[pos0:pos0 + T], sin[pos0:pos0 + T]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, H, T, D) by position.

    cos, sin (T, r) from :func:`rope_cache` broadcast against x's leading dims (RetNet passes
    (T, 1, r) for x (B, T, H, D)).
    With pairs (i, i + r/2): out_i = x_i cos - x_{i+r/2} sin, out_{i+r/2} = x_{i+r/2} cos + x_i sin,
    computed in the promoted dtype of x and cos and cast back. The backward is the same rotation
    by the opposite angle (a rotation's transpose), so it needs nothing saved but cos and sin.
    Written as two products per half into one output buffer.
    """
    if cos.shape[-1] == 0:
        return x
    if not torch.is_grad_enabled():
        return _rotate_no_grad(x, cos, sin)
    return _Rope.apply(x, cos, sin)


def _rotate_no_grad(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` without autograd (generation): out = x cos + [-x2, x1] sin over the
    rotated dims, 7 ops where the buffer-writing form spends 12 (a decode step is op-bound)."""
    r, h = cos.shape[-1], cos.shape[-1] // 2
    xr = x[..., :r] if r < x.shape[-1] else x
    out = xr * cos + torch.cat([-xr[..., h:], xr[..., :h]], -1) * sin
    if r < x.shape[-1]:
        out = torch.cat([out, x[..., r:].to(out.dtype)], -1)
    return out.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """The rotation of :func:`apply_rope` by angle ``sign`` x the cached one."""
    r = cos.shape[-1]
    h = r // 2
    c, s = cos[..., :h], sin[..., :h]       # the cache repeats its angles over both halves
    work = torch.promote_types(x.dtype, cos.dtype)
    shape = torch.broadcast_shapes(x.shape[:-1] + (h,), c.shape)[:-1] + (x.shape[-1],)
    out = torch.empty(shape, dtype=work, device=x.device)
    x1, x2, o1, o2 = x[..., :h], x[..., h:r], out[..., :h], out[..., h:r]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2).addcmul_(x1, s, value=sign)
    if r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    return out.to(x.dtype)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rotate(g, cos, sin, -1.0), None, None


# --------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------
def l2norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (the flash-linear-attention convention)."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim: x / rms(x) · w, or · (1 + w) with ``offset`` (Gemma style).

    Normalises in at least float32 and casts back, like the Gemma 3 / Qwen3-Next norms.
    """

    def __init__(self, dim: int, eps: float, offset: bool):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        w = self.weight.to(torch.promote_types(x.dtype, torch.float32))
        return rms_norm(x, 1 + w if self.offset else w, self.eps)


# --------------------------------------------------------------------------------------------
# KV cache (the attention, block_attention and sparse_attention blocks)
# --------------------------------------------------------------------------------------------
class _KVStore:
    """The buffers a chain of :class:`KVCache` objects writes into, and the ``pos`` of the
    object that wrote last."""

    __slots__ = ("k", "v", "frontier")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, frontier: int):
        self.k, self.v, self.frontier = k, v, frontier


class KVCache:
    """Keys and values one softmax-attention block keeps between calls, written in place.

    Buffers ``k``, ``v``: (B, Hkv, cap, hd). After ``pos`` tokens it keeps

    * ``kind="global"``: every position, p in slot p; with ``limit`` only p < limit (sparse
      attention's first g tokens). ``cap`` grows by doubling, or is set by :meth:`reserve`
      (generation sizes it to the prompt plus the new tokens, so nothing is ever copied);
    * ``kind="window"``, ``ring`` = w: the last min(pos, w) positions, in a ring of w slots;
    * ``kind="block"``, ``ring`` = b: the positions of the block holding the last token seen
      (1 .. b of them).

    In a ring, position p sits in slot (p + shift) % ring; until the ring is full its positions
    sit in slots 0, 1, ... in order (a block's first position is a multiple of b, so shift is
    0 there). A block writes the current token before attending, so a step needs exactly w (b)
    slots: ``state_bytes`` counts w (b) positions for a window (block), T for global attention.

    :meth:`write` returns a new object sharing the buffers: the new keys go into free slots (or
    over the oldest ring slots), nothing else is copied. ``_KVStore.frontier`` records the
    ``pos`` of the newest writer. An older object of the chain stays valid for a global cache
    (its slots are never overwritten; writing from it again copies the buffers first, so a
    generation may branch); a ring overwrites old slots, so using a stale ring object raises
    (:meth:`copy` before branching). Under autograd (keys or buffers that require grad) a write
    builds new buffers out of place, so no tensor a backward needs is modified.
    """

    __slots__ = ("store", "pos", "kind", "ring", "limit", "shift")

    def __init__(self, store: _KVStore, pos: int, kind: str = "global",
                 ring: int | None = None, limit: int | None = None, shift: int = 0):
        self.store, self.pos, self.kind = store, pos, kind
        self.ring, self.limit, self.shift = ring, limit, shift

    @classmethod
    def empty(cls, batch: int, heads: int, dim: int, device, dtype, kind: str = "global",
              ring: int | None = None, limit: int | None = None) -> "KVCache":
        z = torch.zeros(batch, heads, 0, dim, device=device, dtype=dtype)
        return cls(_KVStore(z, z.clone(), 0), 0, kind, ring, limit)

    def copy(self) -> "KVCache":
        """An independent cache with the same content (to branch a ring cache)."""
        self._check_fresh()
        return KVCache(_KVStore(self.store.k.clone(), self.store.v.clone(), self.pos),
                       self.pos, self.kind, self.ring, self.limit, self.shift)

    # -- what is kept ------------------------------------------------------------------------
    def _first(self, end: int) -> int:
        """The first position kept after ``end`` tokens."""
        if self.kind == "window":
            return max(0, end - self.ring)
        if self.kind == "block":
            return (end - 1) // self.ring * self.ring if end else 0
        return 0

    def _stop(self, end: int) -> int:
        """One past the last position kept after ``end`` tokens."""
        return end if self.limit is None else min(end, self.limit)

    def held(self) -> int:
        """Positions kept now."""
        stop = self._stop(self.pos)
        return stop - self._first(stop)

    @property
    def k(self) -> torch.Tensor:
        """The key buffer (B, Hkv, cap, hd); :meth:`ordered` says which slots hold what."""
        return self.store.k

    @property
    def v(self) -> torch.Tensor:
        return self.store.v

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers: what this cache occupies, free slots included."""
        return self.store.k.nbytes + self.store.v.nbytes

    def _check_fresh(self) -> None:
        if self.ring is not None and self.store.frontier != self.pos:
            raise RuntimeError(f"this {self.kind} KV cache (at position {self.pos}) was "
                               f"advanced to position {self.store.frontier} by a later call and "
                               "its ring slots overwritten; copy() it before branching")

    def _slot(self, p: int) -> int:
        return p if self.ring is None else (p + self.shift) % self.ring

    def ordered(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``n`` kept positions, oldest first: (B, Hkv, n, hd) each; views, unless a
        ring wraps between them."""
        self._check_fresh()
        k, v = self.store.k, self.store.v
        s = self._slot(self._stop(self.pos) - n)
        if self.ring is None or s + n <= self.ring:
            return k[:, :, s:s + n], v[:, :, s:s + n]
        r = s + n - self.ring
        return (torch.cat([k[:, :, s:], k[:, :, :r]], 2),
                torch.cat([v[:, :, s:], v[:, :, :r]], 2))

    def all_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every kept position in slot order (a full ring's oldest need not come first): for a
        query that sees them all, where the order does not matter. Views."""
        self._check_fresh()
        n = self.held()
        if self.ring is not None and n == self.ring:
            return self.store.k, self.store.v
        s = self._slot(self._stop(self.pos) - n)
        return self.store.k[:, :, s:s + n], self.store.v[:, :, s:s + n]

    # -- writing -----------------------------------------------------------------------------
    def reserve(self, positions: int) -> None:
        """Room for ``positions`` tokens in all (a ring or a limit needs fewer slots)."""
        want = min(positions, self.ring or positions, self.limit or positions)
        if want > self.store.k.shape[2]:
            self._grow(self.store, want)

    def _grow(self, store: _KVStore, cap: int) -> None:
        """New buffers of ``cap`` slots; the kept positions keep their slots (a ring that is
        not full holds them in slots 0 .. held - 1)."""
        n = self.held()
        k = store.k.new_zeros(store.k.shape[:2] + (cap, store.k.shape[3]))
        v = store.v.new_zeros(k.shape)
        s = self._slot(self._stop(self.pos) - n)
        k[:, :, s:s + n], v[:, :, s:s + n] = store.k[:, :, s:s + n], store.v[:, :, s:s + n]
        store.k, store.v = k, v

    def write(self, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """The cache after the keys and values k, v (B, Hkv, T, hd) of the next T positions."""
        self._check_fresh()
        if torch.is_grad_enabled() and (k.requires_grad or self.store.k.requires_grad):
            return self.rebuilt(k, v)
        end = self.pos + k.shape[2]
        store = self.store
        if store.frontier != self.pos:             # an older global object writes: branch off
            store = _KVStore(store.k.clone(), store.v.clone(), self.pos)
        stop = self._stop(end)
        first = max(self.pos, self._first(stop))   # the new positions that are kept
        if first < stop:
            need = stop if self.ring is None else stop - self._first(stop)
            if need > store.k.shape[2]:
                bound = self.ring or self.limit or 1 << 62
                self._grow(store, max(need, min(2 * store.k.shape[2], bound)))
            src, n, slot = first - self.pos, stop - first, self._slot(first)
            while n:                               # at most twice: a ring wraps once
                m = n if self.ring is None else min(n, self.ring - slot)
                store.k[:, :, slot:slot + m] = k[:, :, src:src + m]
                store.v[:, :, slot:slot + m] = v[:, :, src:src + m]
                src, n, slot = src + m, n - m, 0
        store.frontier = end
        return KVCache(store, end, self.kind, self.ring, self.limit, self.shift)

    def rebuilt(self, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """:meth:`write` out of place: the kept positions, oldest first, in new buffers. On an
        empty cache these are views of k and v, so a whole-sequence forward, which calls this
        directly, copies nothing."""
        n = self.held()
        p0 = self._stop(self.pos) - n                  # the position of the oldest kept one
        end = self.pos + k.shape[2]
        stop = self._stop(end)
        take = max(0, stop - self.pos)                 # new positions kept (a limit drops some)
        seq_k, seq_v = k[:, :, :take], v[:, :, :take]                # positions p0 .. stop - 1
        if n:
            pk, pv = self.ordered(n)
            seq_k = torch.cat([pk.to(k.dtype), seq_k], 2)
            seq_v = torch.cat([pv.to(v.dtype), seq_v], 2)
        first = self._first(stop)
        shift = 0 if self.ring is None else -first % self.ring  # the oldest kept -> slot 0
        self.store.frontier = end
        return KVCache(_KVStore(seq_k[:, :, first - p0:], seq_v[:, :, first - p0:], end), end,
                       self.kind, self.ring, self.limit, shift)


# --------------------------------------------------------------------------------------------
# Softmax attention core (the attention, block_attention and sparse_attention blocks)
# --------------------------------------------------------------------------------------------
class SoftmaxAttentionSpec(BlockSpec):
    """Settings every softmax-attention block shares."""

    n_heads: int = Field(4, ge=1)
    """Query heads."""
    n_kv_heads: int | None = Field(None, ge=1)
    """Key/value heads (GQA); null: n_heads (MHA); 1: MQA."""
    head_dim: int | None = Field(None, ge=1)
    """Per-head width; null: d_model / n_heads."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base."""
    rope_fraction: float = Field(1.0, ge=0, le=1)
    """Share of each head's dims that RoPE rotates (0: no position encoding; Qwen3-Next: 0.25)."""
    bias: bool = False
    """Biases on the q/k/v/o projections."""
    qk_norm: Literal["rms", "rms_offset"] | None = None
    """RMSNorm of q and k over each head's dims before RoPE: rms (scale = weight, from 1),
    rms_offset (scale = 1 + weight, from 0: Gemma 3, Qwen3-Next); null: none."""
    norm_eps: float = Field(1e-6, gt=0)
    """Epsilon of the qk RMSNorm."""
    scale: float | None = Field(None, gt=0)
    """Softmax scale of q.k; null: head_dim ** -0.5 (Gemma 3: query_pre_attn_scalar ** -0.5)."""
    output_gate: bool = False
    """Multiply the attention output by sigmoid of a per-channel gate from x (Qwen3-Next)."""

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def problems(self, d_model, max_seq_len):
        out = heads_problem(d_model, self.n_heads, self.head_dim)
        if self.n_heads % self.kv_heads():
            out.append(("n_kv_heads", self.n_kv_heads,
                        f"n_kv_heads {self.n_kv_heads} does not divide n_heads {self.n_heads}",
                        "use a divisor of n_heads (1 = MQA, n_heads = MHA)"))
        if out:
            return out
        if self.dim(d_model) % 2 or int(self.dim(d_model) * self.rope_fraction) % 2:
            out.append(("head_dim", self.dim(d_model), "RoPE rotates pairs of dims: the head "
                        "dim and its rotated part must be even", "use an even head_dim"))
        return out


class SoftmaxAttention(Block):
    """Projections, qk-norm, RoPE and output gate around ``op("attention")``.

    Subclasses write ``forward`` (which keys to attend, under which mask) and the cache.
    With ``output_gate`` the query projection yields [query | gate] per head (Qwen3-Next's
    layout). The KV cache starts as ``{"k", "v": (B, Hkv, 0, hd), "pos": 0}``.
    """

    def __init__(self, spec: SoftmaxAttentionSpec, d_model: int):
        super().__init__(spec, d_model)
        self.hq, self.hkv, self.hd = spec.n_heads, spec.kv_heads(), spec.dim(d_model)
        gate = 2 if spec.output_gate else 1
        self.q_proj = nn.Linear(d_model, self.hq * self.hd * gate, bias=spec.bias)
        self.k_proj = nn.Linear(d_model, self.hkv * self.hd, bias=spec.bias)
        self.v_proj = nn.Linear(d_model, self.hkv * self.hd, bias=spec.bias)
        self.o_proj = nn.Linear(self.hq * self.hd, d_model, bias=spec.bias)
        if spec.qk_norm is not None:
            offset = spec.qk_norm == "rms_offset"
            self.q_norm = HeadRMSNorm(self.hd, spec.norm_eps, offset)
            self.k_norm = HeadRMSNorm(self.hd, spec.norm_eps, offset)
        self.rot = int(self.hd * spec.rope_fraction) // 2 * 2
        self.rope = RopeTable(self.rot, spec.rope_theta)

    def cache(self, batch, device, dtype, kind: str = "global", ring: int | None = None,
              limit: int | None = None) -> KVCache:
        """An empty :class:`KVCache` shaped for this block's keys."""
        return KVCache.empty(batch, self.hkv, self.hd, device, dtype, kind, ring, limit)

    def init_state(self, batch, device, dtype):
        return self.cache(batch, device, dtype)

    def project(self, x: torch.Tensor, pos0: int):
        """x (B, T, D) at positions pos0.. -> q (B, Hq, T, hd), k, v (B, Hkv, T, hd), gate."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.hq, -1)
        gate = None
        if self.spec.output_gate:
            q, gate = q.chunk(2, dim=-1)                                # (B, T, Hq, hd) each
            gate = gate.reshape(B, T, self.hq * self.hd)
        k = self.k_proj(x).view(B, T, self.hkv, self.hd)
        v = self.v_proj(x).view(B, T, self.hkv, self.hd).transpose(1, 2)   # (B, Hkv, T, hd)
        if self.spec.qk_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = self.rope.get(pos0, T, x.device, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, gate

    def attend(self, q, k, v, **mask) -> torch.Tensor:
        """``op("attention")`` with this block's scale; mask: the op's position arguments."""
        return op("attention")(q, k, v, scale=self.spec.scale, **mask)

    def output(self, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """y (B, Hq, T, hd) -> (B, T, D): merge heads, gate, o_proj."""
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, self.hq * self.hd)
        if gate is not None:
            y = y * torch.sigmoid(gate)
        return self.o_proj(y)

    def mask(self) -> dict:
        """This block's visibility arguments of ``op("attention")`` (``window``,
        ``block_size``); subclasses name theirs."""
        return {}

    def forward(self, x, state=None):
        mask = self.mask()
        q, k, v, gate = self.project(x, 0 if state is None else state.pos)
        if state is None:                     # whole sequence: the cache views k and v
            y = self.attend(q, k, v, **mask)
            state = self.init_state(x.shape[0], x.device, x.dtype).rebuilt(k, v)
        else:
            y, state = self.attend_cached(q, k, v, state, **mask)
        return self.output(y, gate), state

    def attend_cached(self, q, k, v, cache: KVCache, **mask) -> tuple[torch.Tensor, KVCache]:
        """Attention of this call's queries over ``cache`` and the new keys k, v; returns
        (y, the cache after them). ``mask``: ``window`` or ``block_size`` of a ring cache.

        One new token (a decode step): write it, then the query sees every kept position
        (the ring keeps exactly those inside its window or block), no mask and no copy.
        Several (a prefill chunk): the positions they may see that the cache holds, oldest
        first, then the new ones, under the op's mask; a global cache is written first and
        read back as one view.
        """
        pos0, T = cache.pos, q.shape[2]
        if T == 1:
            cache = cache.write(k, v)
            K, V = cache.all_slots()
            return self.attend(q, K, V, q_pos0=K.shape[2] - 1, k_pos0=0), cache
        if cache.ring is None:
            cache = cache.write(k, v)
            K, V = cache.ordered(cache.held())
            return self.attend(q, K, V, q_pos0=pos0, k_pos0=0, **mask), cache
        w = mask.get("window")
        n = min(pos0, w - 1) if w is not None else pos0 % mask["block_size"]
        pk, pv = cache.ordered(n)
        K = torch.cat([pk.to(k.dtype), k], 2) if n else k
        V = torch.cat([pv.to(v.dtype), v], 2) if n else v
        y = self.attend(q, K, V, q_pos0=pos0, k_pos0=pos0 - n, **mask)
        return y, cache.write(k, v)

    @classmethod
    def projection_flops(cls, spec, d_model) -> float:
        hq, hkv, hd = spec.n_heads, spec.kv_heads(), spec.dim(d_model)
        gate = 2 if spec.output_gate else 1
        return linear_flops((d_model, gate * hq * hd), (d_model, 2 * hkv * hd),
                            (hq * hd, d_model))

    @classmethod
    def mixing_flops(cls, spec, d_model, keys: float) -> float:
        """q.k scores and p.v for ``keys`` visible keys per query, 2 FLOPs per MAC."""
        return 2 * 2 * spec.n_heads * spec.dim(d_model) * keys

    @classmethod
    def cache_bytes(cls, spec, d_model, positions: int, dtype_bytes: int) -> int:
        return 2 * spec.kv_heads() * spec.dim(d_model) * positions * dtype_bytes


def mean_visible(T: int, window: int | None) -> float:
    """Mean number of keys a causal query sees over positions 1..T."""
    if window is None or window >= T:
        return (T + 1) / 2
    # positions 1..w-1 see t keys, the rest see w
    head = (window - 1) * window / 2
    return (head + (T - window + 1) * window) / T


# --------------------------------------------------------------------------------------------
# Feed-forward core (the mlp block and MoE experts)
# --------------------------------------------------------------------------------------------
_ACT = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu}


class MLPSpec(BlockSpec):
    """FFN settings."""

    kind: Literal["mlp"] = "mlp"
    activation: Literal["swiglu", "geglu", "gelu"] = "swiglu"
    """swiglu / geglu (gated) or gelu (plain)."""
    d_ff: int | None = Field(None, ge=1)
    """Hidden width; null: 8/3 d_model (gated, rounded up to 64) or 4 d_model (plain)."""
    bias: bool = False
    """Biases in the projections."""

    def gated(self) -> bool:
        return self.activation != "gelu"

    def hidden(self, d_model: int) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.gated():
            return -(-(8 * d_model // 3) // 64) * 64
        return 4 * d_model


class FeedForward(Block):
    """Gated: down(act(gate(x)) * up(x)); plain: down(act(up(x))). No sequence state.

    The ``mlp`` block registers it as is; MoE builds its experts from it.
    """

    def __init__(self, spec: MLPSpec, d_model: int):
        super().__init__(spec, d_model)
        h = spec.hidden(d_model)
        self.act = _ACT[spec.activation]
        self.up = nn.Linear(d_model, h, bias=spec.bias)
        self.gate = nn.Linear(d_model, h, bias=spec.bias) if spec.gated() else None
        self.down = nn.Linear(h, d_model, bias=spec.bias)

    def forward(self, x, state=None):
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(h), None

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        h = spec.hidden(d_model)
        n_in = 2 if spec.gated() else 1
        return linear_flops(*[(d_model, h)] * n_in, (h, d_model))


# --------------------------------------------------------------------------------------------
# Token routing (moe, routed)
# --------------------------------------------------------------------------------------------
def run_grouped(x: torch.Tensor, token: torch.Tensor, which: torch.Tensor,
                weight: torch.Tensor, modules: Sequence[nn.Module]) -> torch.Tensor:
    """Sparse dispatch: y[n] = sum over pairs j with token_j = n of weight_j * F_{which_j}(x[n]).

    x: (N, D) tokens; token, which, weight: (M,) one entry per (token, module) pair; modules:
    position-wise blocks (``F(x (1, n, D)) -> (y, None)``). Pairs are grouped by module with a
    stable sort, each module runs once on its own tokens, results are scattered back.
    Returns (N, D); tokens in no pair get 0.
    """
    order = torch.argsort(which, stable=True)
    token, weight = token[order], weight[order]
    counts = torch.bincount(which, minlength=len(modules)).tolist()
    parts = torch.split(x[token], counts)                       # per module: (n_i, D)
    outs = [modules[i](p[None])[0][0] for i, p in enumerate(parts) if p.shape[0]]
    y = x.new_zeros(x.shape)
    if not outs:
        return y
    return y.index_add(0, token, torch.cat(outs) * weight[:, None].to(x.dtype))


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor, n: int) -> torch.Tensor:
    """Switch load-balancing loss n * sum_i f_i P_i.

    probs: (N, n) router probabilities; chosen: (N, k) indices picked per token.
    f_i = (times i was picked) / N (no gradient), P_i = mean router probability of i.
    """
    f = torch.bincount(chosen.reshape(-1), minlength=n).to(probs.dtype) / probs.shape[0]
    return n * (f * probs.mean(0)).sum()
