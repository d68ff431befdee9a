"""RWKV-7 "Goose" time mixing. Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State
Evolution" (arXiv 2503.14456).

Its state update is a generalised delta rule (a diagonal decay plus a rank-1
in-context-learning term), so it runs on the same ``delta_rule`` op as DeltaNet and Gated
DeltaNet.

Glossary (paper -> code), per head h of N = head_dim channels, D = d_model = H N:
x_{t-1} the previous token (token shift), mu_* the per-channel lerp weights; r receptance
(the query); w decay in (exp(-e^{-1/2}), 1) per channel; k key; v value; a in-context
learning rate in (0, 1); kappa_hat the normalised removal key; g the output gate.

    x_* = x_t + (x_{t-1} - x_t) * mu_*                   for * in r, w, k, v, a, g
    r, k, v = W_r x_r, W_k x_k, W_v x_v
    log w = -exp(-softplus(-(w_0 + tanh(x_w W_w1) W_w2)) - 1/2)
    a = sigmoid(a_0 + x_a W_a1 W_a2),   g = sigmoid(x_g W_g1) W_g2
    kappa_hat = l2norm(k * k_k) per head,   k = k * (1 + (a - 1) * k_a)
    S_t = S_{t-1} (diag(w_t) - kappa_hat_t^T (a_t * kappa_hat_t)) + v_t^T k_t   (V x K)
    o_t = groupnorm(S_t r_t) + (r_t . (k_t * r_k)) v_t                 (per head)
    out = W_o (o * g)

The recurrence is the ``delta_rule`` op with a = -kappa_hat, b = kappa_hat * a and a
per-channel log w. Not included: the value residual (v mixed with the first layer's v), which
needs state passed between layers; the channel-mixing FFN, which is a separate sub-layer.
State: ``{"shift": (B, D) the last input, "wkv": (B, H, N, N)}``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from composer.core.block import Block, BlockSpec, accum_dtype, linear_flops
from composer.core.kernels import op
from composer.core.registry import register_block

_BRANCHES = ("r", "w", "k", "v", "a", "g")
_MIX_POWER = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.5, "a": 0.9, "g": 0.2}
"""mu_c = 1 - (c / D)^p: early channels lean on the previous token, later on the current."""


class RWKV7Spec(BlockSpec):
    """RWKV-7 time-mixing settings (low-rank widths sized for small CPU models)."""

    kind: Literal["rwkv7"] = "rwkv7"
    head_dim: int = Field(64, ge=1)
    """N: channels per head; heads = d_model / head_dim (RWKV-7 uses 64)."""
    decay_rank: int = Field(32, ge=1)
    """Width of the low-rank MLP giving the decay w."""
    a_rank: int = Field(32, ge=1)
    """Width of the low-rank map giving the in-context learning rate a."""
    gate_rank: int = Field(64, ge=1)
    """Width of the low-rank MLP giving the output gate g."""
    chunk_size: int = Field(32, ge=1)
    """Chunk length of the chunked delta-rule backend."""
    norm_eps: float = Field(64e-5, gt=0)
    """Group-norm epsilon (RWKV-7: 1e-5 per head channel, 64e-5 at head_dim 64)."""

    def problems(self, d_model, max_seq_len):
        if d_model % self.head_dim:
            return [("head_dim", self.head_dim,
                     f"d_model {d_model} is not divisible by head_dim {self.head_dim}",
                     "pick a head_dim dividing d_model")]
        return []


def _low_rank(d_model: int, rank: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Factors (D, r), (r, D): a small random first factor (so both receive gradients from the
    start) and an orthogonal second one scaled by 0.1."""
    first = nn.Parameter(torch.randn(d_model, rank) / math.sqrt(d_model) * 0.1)
    second = nn.Parameter(nn.init.orthogonal_(torch.empty(rank, d_model)) * 0.1)
    return first, second


@register_block("rwkv7", spec=RWKV7Spec, role="mixer", symbol="W",
                summary="RWKV-7 time mixing (generalised delta rule), chunked")
class RWKV7(Block):
    """RWKV-7 time mixing: token shift, data-dependent decay and in-context learning rate."""

    def __init__(self, spec: RWKV7Spec, d_model: int):
        super().__init__(spec, d_model)
        D, N = d_model, spec.head_dim
        self.H, self.N = D // N, N
        frac = torch.arange(D, dtype=torch.float32) / D
        self.mu = nn.ParameterDict({c: nn.Parameter(1.0 - frac ** _MIX_POWER[c])
                                    for c in _BRANCHES})
        self.receptance = nn.Linear(D, D, bias=False)
        self.key = nn.Linear(D, D, bias=False)
        self.value = nn.Linear(D, D, bias=False)
        self.output = nn.Linear(D, D, bias=False)
        # w_0 spreads the base decay from slow (log w ~ -e^-7) to fast (~ -e^-2) channels
        self.w0 = nn.Parameter(-6.5 + 5.0 * frac ** 1.5)
        self.w1, self.w2 = _low_rank(D, spec.decay_rank)
        self.a0 = nn.Parameter(torch.zeros(D))
        self.a1, self.a2 = _low_rank(D, spec.a_rank)
        self.g1, self.g2 = _low_rank(D, spec.gate_rank)
        self.k_k = nn.Parameter(torch.full((D,), 0.85))
        self.k_a = nn.Parameter(torch.ones(D))
        self.r_k = nn.Parameter(torch.zeros(self.H, N))
        self.ln_x = nn.GroupNorm(self.H, D, eps=spec.norm_eps)

    def init_state(self, batch, device, dtype):
        acc = accum_dtype(dtype)
        return {"shift": torch.zeros(batch, self.d_model, device=device, dtype=dtype),
                "wkv": torch.zeros(batch, self.H, self.N, self.N, device=device, dtype=acc)}

    def forward(self, x, state=None):
        B, T, D = x.shape
        H, N = self.H, self.N
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        prev = torch.cat([state["shift"][:, None].to(x.dtype), x[:, :-1]], 1)    # x_{t-1}
        xs = {c: torch.lerp(x, prev, self.mu[c].to(x.dtype)) for c in _BRANCHES}
        r, k, v = self.receptance(xs["r"]), self.key(xs["k"]), self.value(xs["v"])
        acc = state["wkv"].dtype
        w = -F.softplus(-(self.w0 + torch.tanh(xs["w"] @ self.w1) @ self.w2)) - 0.5
        log_w = -w.to(acc).exp()                                          # (B, T, D), < 0
        a = torch.sigmoid(self.a0 + xs["a"] @ self.a1 @ self.a2)
        g = torch.sigmoid(xs["g"] @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1)          # kappa_hat
        k = k * (1 + (a - 1) * self.k_a)
        r_, k_, v_, b_, lw_, a_ = (t.to(acc).reshape(B, T, H, N)          # (B, T, H, N)
                                   for t in (r, k, v, kk * a.view(B, T, H, N), log_w, -kk))
        o, wkv = op("delta_rule")(r_, k_, v_, b_, lw_, state["wkv"], a=a_,
                                  chunk_size=self.spec.chunk_size)
        o = self.ln_x(o.to(x.dtype).reshape(B * T, D)).view(B, T, H, N)
        bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * self.r_k).sum(-1, keepdim=True)
        o = (o + bonus * v.view(B, T, H, N)).reshape(B, T, D)
        return self.output(o * g), {"shift": x[:, -1], "wkv": wkv}

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        D, N = d_model, spec.head_dim
        proj = linear_flops((D, D), (D, D), (D, D), (D, D))
        low_rank = 2 * linear_flops((D, spec.decay_rank), (D, spec.a_rank), (D, spec.gate_rank))
        # recurrent form per head: decay (1), read a^T S (2), write b (2), write k v^T (2),
        # read S r (2), each over N x N
        return proj + low_rank + 9 * (D // N) * N * N

    @classmethod
    def state_bytes(cls, spec, d_model, T, dtype_bytes=4):
        return (d_model + (d_model // spec.head_dim) * spec.head_dim ** 2) * dtype_bytes
