"""Built-in blocks. Importing this package registers every kernel op and block type.

One module per block family (and one per op under ``blocks/ops``); each registers itself, so a
new block type is one file here: this package imports every module it contains, ops first.
``common`` holds the helpers several blocks share and registers nothing; a block module imports
from it and from ``composer.core`` (ops are reached through ``op(name)``), never from another
block module.
Third-party packages register the same way through the ``hycomp.blocks`` entry-point group.
"""
import importlib
import pkgutil
import sys

from blocks import ops as _ops

for _pkg in (_ops, sys.modules[__name__]):
    for _m in sorted(pkgutil.iter_modules(_pkg.__path__), key=lambda m: m.name):
        if not _m.ispkg and not _m.name.startswith("_"):
            importlib.import_module(f"{_pkg.__name__}.{_m.name}")
