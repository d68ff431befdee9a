"""Zoology's BaseConv against a loop over tokens and taps."""
import pytest
import torch

from composer.core.registry import block_types


def _by_loop(blk, x):
    """y_t = (W x_t + b) ⊙ (bias + Σ_j w_j x_{t-k+1+j}), inputs before 0 being 0."""
    B, T, D = x.shape
    w, k = blk.conv.weight[:, 0].double(), blk.spec.kernel_size
    out = torch.zeros(B, T, D, dtype=torch.float64)
    for t in range(T):
        c = blk.conv.bias.double().clone().expand(B, D).clone()
        for j in range(k):
            s = t - (k - 1) + j
            if s >= 0:
                c += w[:, j] * x[:, s].double()
        out[:, t] = (x[:, t].double() @ blk.proj.weight.double().T + blk.proj.bias.double()) * c
    return out


@pytest.mark.parametrize("k, T", [(3, 1), (3, 7), (4, 13), (2, 5)])
def test_base_conv_equals_the_loop(k, T):
    g = torch.Generator().manual_seed(k * 100 + T)
    bt = block_types()["base_conv"]
    torch.manual_seed(T)
    blk = bt.module(bt.spec(kernel_size=k), 8)
    x = torch.randn(3, T, 8, generator=g)
    y, state = blk(x)
    torch.testing.assert_close(y.double(), _by_loop(blk, x), rtol=1e-5, atol=1e-6)
    # the state is the last k - 1 inputs (zeros before the first)
    tail = torch.cat([torch.zeros(3, k - 1, 8), x], 1)[:, -(k - 1):]
    torch.testing.assert_close(state["conv"], tail.transpose(1, 2))
    assert bt.module.state_bytes(blk.spec, 8, T) == 8 * (k - 1) * 4
