"""``sdpa`` backend of ``attention`` (what ``auto`` picks): one dense
``scaled_dot_product_attention`` call, or the banded chunks of :mod:`.chunked` once the keys
outgrow a band's span by 4/3."""
from __future__ import annotations

from blocks.ops.attention import OP
from blocks.ops.attention._common import _check, _dense
from blocks.ops.attention.chunked import banded, layout
from composer.core.registry import register_backend


@register_backend(OP, "sdpa", priority=10)
def attention_sdpa(q, k, v, *, q_pos0: int = 0, k_pos0: int = 0,
                   window: int | None = None, scale: float | None = None,
                   block_size: int | None = None, k_global=None, v_global=None):
    """``scaled_dot_product_attention``: dense, or banded chunks once the keys outgrow them."""
    _check(window, k_global, v_global)
    args = (q, k, v, q_pos0, k_pos0, window, scale, block_size, k_global, v_global)
    if window is None and block_size is None:
        return _dense(*args)
    span = layout(q.shape[2], q_pos0, window, block_size)[4]
    return (banded if 3 * k.shape[2] > 4 * span else _dense)(*args)
