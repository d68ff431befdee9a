"""Block test cases, one module per block family: ``CASES = {case name: block settings}``.

A case's settings may name ``kind`` (default: the case name). ``tests/blocks/test_blocks.py`` runs the
three-mode, backend and gradient checks over every case of every module here, and checks that
every registered block type has at least one case.
"""
import importlib
import pkgutil


def all_cases() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        cases = importlib.import_module(f"{__name__}.{m.name}").CASES
        dup = set(out) & set(cases)
        assert not dup, f"case names used twice: {dup}"
        out.update(cases)
    return out
