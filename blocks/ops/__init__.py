"""Kernel ops, one package per op (``attention``, ``recurrence`` for ``gated_linear_recurrence``,
``delta`` for ``delta_rule``), each with its ``reference`` beside the fast backends. Importing
this package registers every op and backend, in this order; blocks reach them only through
``composer.core.kernels.op(name)``. Helpers shared by several ops: :mod:`blocks.ops.common`."""
from blocks.ops import attention, recurrence, delta

__all__ = ["attention", "recurrence", "delta"]
