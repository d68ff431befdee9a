"""The package's imports follow the data flow: no cycles, no import from a later stage.

Stages, earliest first: core (contract) → recipe → build → run, viz → cli. Function-level
(deferred) imports count too: a deferred import still ties the modules together.
"""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
RANK = {"core": 0, "recipe": 1, "build": 2, "run": 3, "viz": 3, "cli": 4}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _graph() -> nx.DiGraph:
    files = sorted(ROOT.glob("composer/**/*.py")) + sorted(ROOT.glob("blocks/**/*.py"))
    mods = {_module(f): f for f in files}
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for imp in _imports(f, package):
            # the deepest module this import names (``composer.viz.draw.draw`` -> the module)
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != name and not name.startswith(imp + "."):
                g.add_edge(name, imp)
    return g


def _stage(mod: str) -> int | None:
    parts = mod.split(".")
    return RANK.get(parts[1]) if parts[0] == "composer" and len(parts) > 1 else None


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(_graph()))
    assert not cycles, f"import cycles: {cycles}"


def test_no_import_from_a_later_stage():
    g = _graph()
    back = [(a, b) for a, b in g.edges
            if _stage(a) is not None and _stage(b) is not None and _stage(b) > _stage(a)]
    assert not back, f"modules importing a later stage: {back}"


def test_composer_reaches_blocks_only_through_the_registry():
    # the registry imports the built-in blocks by name (entry points); no stage imports them
    g = _graph()
    direct = [(a, b) for a, b in g.edges if a.startswith("composer") and b.startswith("blocks")]
    assert not direct, direct


def test_no_block_imports_another_block():
    g = _graph()
    blocks = {m for m in g if m.startswith("blocks.") and not m.startswith("blocks.ops")
              and m != "blocks.common"}
    bad = [(a, b) for a, b in g.edges if a in blocks and b in blocks]
    assert not bad, f"blocks importing sibling blocks: {bad}"


def test_the_checker_sees_imports():
    # guards the tests above against passing vacuously: known edges must be found
    g = _graph()
    assert g.has_edge("composer.build.model", "composer.build.graph")
    assert g.has_edge("composer.recipe.validate", "composer.recipe.schedule")
    assert g.has_edge("composer.cli.main", "composer.viz")  # a deferred import inside a function
