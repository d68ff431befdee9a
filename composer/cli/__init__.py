"""Stage 4, the ``hycomp`` command: parses arguments and calls the stages; no logic of its own
beyond reporting (``check``, ``viz``, ``schema``, ``kernels``, ``train``)."""
from composer.cli.main import main

__all__ = ["main"]
