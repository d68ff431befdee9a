"""Built-in blocks. Importing this package registers every block type and kernel op.

One module per block family; each registers itself. A new block type is one file here (or in
a plug-in package exposing the ``hycomp.blocks`` entry-point group).
"""
from blocks.ops import attention as _attention_op, recurrence as _recurrence_op  # noqa: F401
from blocks import attention, mamba2, mlp, parallel  # noqa: F401
