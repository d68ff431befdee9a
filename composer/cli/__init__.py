"""Stage 4, the ``hycomp`` command: :mod:`.main` parses arguments and calls the stages, with no
logic of its own beyond reporting (``check``, ``viz``, ``schema``, ``kernels``, ``train``);
:mod:`.prepare` is the one path every command validates a recipe through (schema, device, a
probe of the kernels it names), so ``check`` rejects whatever ``train`` would."""
from composer.cli.main import main

__all__ = ["main"]
