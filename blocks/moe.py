"""Mixture of experts FFN: top-k token routing over SwiGLU experts, optional shared expert.

Shazeer et al. 2017 (sparsely-gated MoE); Fedus et al. 2021 (Switch Transformer, the
load-balancing loss); Jamba / Mixtral (softmax, top-k); DeepSeekMoE / Qwen-MoE (shared expert).

Glossary (paper -> code): E = n_experts, k = top_k, N = B * T tokens, W_r router (E x D),
p_t = softmax(W_r x_t) router probabilities, S_t the k experts chosen for token t, w_ti their
combine weights, f_i the share of tokens dispatched to expert i, P_i the mean router
probability of expert i.

    p_t   = softmax(W_r x_t)                                  (router, over all E experts)
    S_t   = top-k(p_t);  w_ti = p_ti for i in S_t             (router "softmax_topk": Jamba)
          optionally w_ti /= sum_{j in S_t} p_tj              (normalize_topk: Mixtral, Qwen3)
    y_t   = sum_{i in S_t} w_ti FFN_i(x_t)  [+ sigmoid(g . x_t)] [+ FFN_shared(x_t)]
    L_aux = coef * E * sum_i f_i P_i,  f_i = #{t : i in S_t} / N,  P_i = mean_t p_ti

f sums to k (each token is dispatched to k experts), so a perfectly balanced router gives
L_aux = coef * k; this is the formula of Switch (k = 1) as Mixtral and Jamba apply it to top-k.
The loss reaches the trainer through :func:`composer.core.aux.add_aux_loss`.

Dispatch: the (token, expert) pairs are sorted by expert, each expert runs once on exactly its
own tokens (no dense all-experts compute, no capacity, no dropped tokens) and the weighted
results are scattered back with ``index_add``. No sequence state.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from blocks.common import FeedForward, MLPSpec, balance_loss, run_grouped
from composer.core.aux import add_aux_loss
from composer.core.block import Block, BlockSpec, accum_dtype, linear_flops
from composer.core.registry import register_block


class MoESpec(BlockSpec):
    """Mixture-of-experts settings (defaults: Mixtral's 8 experts, top-2)."""

    kind: Literal["moe"] = "moe"
    n_experts: int = Field(8, ge=1)
    """E: routed experts."""
    top_k: int = Field(2, ge=1)
    """k: experts each token runs through."""
    router: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    """softmax_topk: softmax over all experts, keep the k largest probabilities (Jamba,
    DeepSeek); topk_softmax: keep the k largest logits, softmax over those k (Mixtral's
    formulation; the weights sum to 1, the same as softmax_topk with normalize_topk)."""
    normalize_topk: bool = False
    """Rescale the k kept weights to sum to 1 (Mixtral, Qwen3-MoE); false keeps Jamba's raw
    probabilities."""
    expert: MLPSpec = Field(default_factory=MLPSpec)
    """Settings of every routed expert (an `mlp` block: activation, d_ff, bias)."""
    shared_expert: MLPSpec | None = None
    """An always-on expert added to every token (DeepSeekMoE, Qwen-MoE); null: none."""
    shared_expert_gate: bool = False
    """Scale the shared expert by sigmoid(g . x) per token (Qwen2-MoE / Qwen3-Next)."""
    aux_loss_coef: float = Field(0.01, ge=0)
    """Coefficient of the load-balancing loss (Switch's 0.01; 0 disables it)."""

    def problems(self, d_model, max_seq_len):
        out = []
        if self.top_k > self.n_experts:
            out.append(("top_k", self.top_k, f"a token cannot pick {self.top_k} of "
                        f"{self.n_experts} experts", "use top_k <= n_experts"))
        if self.router == "topk_softmax" and self.top_k == 1:
            out.append(("router", self.router, "with top_k 1 the softmax over the one kept "
                        "logit is always 1, so the router would get no gradient from the output",
                        "use router: softmax_topk (Switch's top-1: the weight is p_ti)"))
        if self.shared_expert_gate and self.shared_expert is None:
            out.append(("shared_expert_gate", True, "there is no shared expert to gate",
                        "set shared_expert (e.g. {d_ff: 256}) or shared_expert_gate: false"))
        return out


@register_block("moe", spec=MoESpec, role="ffn", symbol="E",
                summary="mixture of SwiGLU experts, top-k router, optional shared expert")
class MoE(Block):
    """Top-k routed mixture of experts; only the chosen experts run for each token."""

    def __init__(self, spec: MoESpec, d_model: int):
        super().__init__(spec, d_model)
        self.router = nn.Linear(d_model, spec.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(spec.expert, d_model)
                                     for _ in range(spec.n_experts))
        self.shared = FeedForward(spec.shared_expert, d_model) if spec.shared_expert else None
        self.shared_gate = (nn.Linear(d_model, 1, bias=False) if spec.shared_expert_gate
                            else None)

    def route(self, logits: torch.Tensor):
        """logits (N, E) -> weights (N, k), experts (N, k), probabilities (N, E).

        Probabilities and weights are computed in float32 (float64 for float64 inputs)."""
        s = self.spec
        acc = accum_dtype(logits.dtype)
        probs = logits.softmax(-1, dtype=acc)
        if s.router == "softmax_topk":
            w, idx = probs.topk(s.top_k, dim=-1)
        else:
            top, idx = logits.topk(s.top_k, dim=-1)
            w = top.softmax(-1, dtype=acc)
        if s.normalize_topk:
            w = w / w.sum(-1, keepdim=True)
        return w, idx, probs

    def forward(self, x, state=None):
        B, T, D = x.shape
        s = self.spec
        xf = x.reshape(B * T, D)                                            # (N, D)
        w, idx, probs = self.route(self.router(xf))                         # (N, k) (N, k)
        token = torch.arange(B * T, device=x.device).repeat_interleave(s.top_k)   # (N k,)
        y = run_grouped(xf, token, idx.reshape(-1), w.reshape(-1), self.experts)
        if self.shared is not None:
            sh, _ = self.shared(xf)
            if self.shared_gate is not None:
                sh = sh * torch.sigmoid(self.shared_gate(xf))
            y = y + sh
        if s.aux_loss_coef > 0:
            add_aux_loss(s.aux_loss_coef * balance_loss(probs, idx, s.n_experts))
        return y.view(B, T, D), None

    @classmethod
    def flops_per_token(cls, spec, d_model, T):
        """Router, the k active experts and the shared expert (and its gate) only."""
        per = FeedForward.flops_per_token(spec.expert, d_model, T)
        out = linear_flops((d_model, spec.n_experts)) + spec.top_k * per
        if spec.shared_expert is not None:
            out += FeedForward.flops_per_token(spec.shared_expert, d_model, T)
            if spec.shared_expert_gate:
                out += linear_flops((d_model, 1))
        return out
