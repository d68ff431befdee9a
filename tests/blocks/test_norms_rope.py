"""rms_norm and apply_rope (hand-written backwards) against their textbook autograd forms."""
from __future__ import annotations

import pytest
import torch

from blocks.common import apply_rope, rope_cache
from composer.core.norms import RMSNorm, rms_norm


def rms_textbook(x, w, eps):
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    return (h if w is None else h * w.to(h.dtype)).to(x.dtype)


def rope_textbook(x, cos, sin):
    """x * cos + rotate_half(x) * sin over the first r dims (GPT-NeoX pairing)."""
    r = cos.shape[-1]
    xr, rest = x[..., :r], x[..., r:]
    rot = torch.cat([-xr[..., r // 2:], xr[..., : r // 2]], dim=-1)
    work = torch.promote_types(x.dtype, cos.dtype)
    out = (xr.to(work) * cos + rot.to(work) * sin).to(x.dtype)
    return torch.cat([out, rest], dim=-1)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape,wshape", [((2, 7, 16), (16,)), ((1, 1, 32), (32,)),
                                          ((3, 5, 4, 8), (4, 8)), ((2, 9, 12), None)])
def test_rms_norm_matches_textbook_forward_and_gradients(shape, wshape):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 0.5
    w = None if wshape is None else torch.randn(*wshape, generator=g, dtype=torch.float64)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    leaves = [x.clone().requires_grad_()] + ([] if w is None else [w.clone().requires_grad_()])
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ours = rms_norm(leaves[0], leaves[1] if w is not None else None, 1e-5)
    ref = rms_textbook(ref_leaves[0], ref_leaves[1] if w is not None else None, 1e-5)
    assert rel(ours, ref) < 1e-12
    ours.backward(dy), ref.backward(dy)
    for a, b in zip(leaves, ref_leaves):
        assert torch.isfinite(a.grad).all() and rel(a.grad, b.grad) < 1e-10


def test_rms_norm_gradcheck_and_partial_grads():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))
    # only the weight needs a gradient (x from a frozen layer), and only x
    xd = x.detach()
    gw, = torch.autograd.grad((rms_norm(xd, w, 1e-6) * xd).sum(), w)
    gw_ref, = torch.autograd.grad((rms_textbook(xd, w, 1e-6) * xd).sum(), w)
    assert rel(gw, gw_ref) < 1e-10
    wd = w.detach()
    gx, = torch.autograd.grad((rms_norm(x, wd, 1e-6) ** 2).sum(), x)
    gx_ref, = torch.autograd.grad((rms_textbook(x, wd, 1e-6) ** 2).sum(), x)
    assert rel(gx, gx_ref) < 1e-10


def test_rms_norm_low_precision_and_module():
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    w = torch.randn(64)
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    assert rel(y.float(), rms_textbook(x, w, 1e-6).float()) < 1e-2
    m, ref = RMSNorm(64, eps=1e-5), torch.nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        m.weight.normal_()
    ref.load_state_dict(m.state_dict())                  # same parameter names
    x = torch.randn(3, 4, 64)
    assert rel(m(x), ref(x)) < 1e-6


def test_rms_norm_of_a_head_major_view_is_contiguous():
    """An op's head-major output seen as (B, T, H, D): the norm's result is laid out (B, T, H, D)
    so that merging the heads afterwards is a view; values and gradients as the textbook's."""
    raw = torch.randn(2, 3, 7, 16, dtype=torch.float64)              # (B, H, T, D) memory
    w = torch.randn(16, dtype=torch.float64)
    a = raw.clone().requires_grad_()
    b = raw.clone().requires_grad_()
    y = rms_norm(a.transpose(1, 2), w, 1e-6)
    ref = rms_textbook(b.transpose(1, 2), w, 1e-6)
    assert y.is_contiguous() and rel(y, ref) < 1e-12
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy), ref.backward(dy)
    assert rel(a.grad, b.grad) < 1e-10


def test_rms_norm_rejects_a_mismatched_weight():
    with pytest.raises(ValueError, match="does not match"):
        rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)


@pytest.mark.parametrize("T,D,r,layout", [(1, 8, 8, "bhtd"), (13, 64, 64, "bhtd"),
                                          (9, 64, 16, "bhtd"), (11, 12, 6, "bthd")])
def test_rope_matches_textbook_forward_and_gradients(T, D, r, layout):
    g = torch.Generator().manual_seed(T * 100 + r)
    shape = (2, 3, T, D) if layout == "bhtd" else (2, T, 3, D)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    cos, sin = rope_cache(r, 10000.0, torch.arange(5, 5 + T), torch.float64)
    if layout == "bthd":                                   # RetNet's (B, T, H, D)
        cos, sin = cos[:, None], sin[:, None]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = apply_rope(a, cos, sin), rope_textbook(b, cos, sin)
    assert rel(ours, ref) < 1e-13
    dy = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    ours.backward(dy), ref.backward(dy)
    assert rel(a.grad, b.grad) < 1e-12
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin), (x[:1, :1].clone()
                                                                        .requires_grad_(),))


def test_rope_on_a_strided_view_and_in_bf16():
    x = torch.randn(1, 6, 4, 32)                           # (B, T, H, D) seen as (B, H, T, D)
    xt = x.transpose(1, 2)
    cos, sin = rope_cache(32, 500.0, torch.arange(6), torch.float32)
    assert rel(apply_rope(xt, cos, sin), rope_textbook(xt, cos, sin)) < 1e-6
    xb = xt.to(torch.bfloat16)
    yb = apply_rope(xb, cos, sin)
    assert yb.dtype == torch.bfloat16
    assert rel(yb.float(), rope_textbook(xb, cos, sin).float()) < 1e-2
    assert apply_rope(xt, cos[:, :0], sin[:, :0]) is xt    # rope_fraction 0: untouched
