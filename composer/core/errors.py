"""User-facing errors: each says what is wrong, where, why, and how to fix it.

The CLI prints a :class:`HycompError` without a traceback and exits with ``exit_code`` (2 for bad
input, as argparse does).
"""
from __future__ import annotations


class HycompError(Exception):
    """An error caused by the user's input (recipe, override, file), not by a bug."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, why: str | None = None,
                 fix: str | None = None, problems: list["HycompError"] | None = None):
        self.what, self.where, self.why, self.fix = what, where, why, fix
        self.problems = problems or []
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"error: {self.what}"]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.why:
            lines.append(f"  why:   {self.why}")
        if self.fix:
            lines.append(f"  fix:   {self.fix}")
        for p in self.problems:
            lines.append("")
            lines.extend(p.render().splitlines())
        return "\n".join(lines)


class RecipeError(HycompError):
    """A recipe (YAML file, composition, or override) is not valid."""


class DataError(HycompError):
    """A data file or folder is missing, empty or unreadable."""


class CheckpointError(HycompError):
    """A checkpoint is missing, corrupt, or belongs to another model."""
