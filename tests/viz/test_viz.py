"""Pictures of the layer graph: table, DOT, Mermaid, and files from both renderers."""
import re
import shutil
import struct
import xml.etree.ElementTree as ET

import pytest

import composer
from composer import viz
from composer.core.errors import HycompError
from composer.build.costs import totals
from composer.build.graph import execution_order

T = 256
SMALL = ["model.d_model=32"]
HAS_DOT = shutil.which("dot") is not None


def _from_dict(model_changes: dict):
    d = composer.compose_dict("config", SMALL)
    d["model"].update(n_layers=None, **{k: v for k, v in model_changes.items() if k != "blocks"})
    d["model"]["blocks"].update(model_changes.get("blocks", {}))
    return composer.validate_recipe(d)


@pytest.fixture(scope="module")
def recipes():
    shared = _from_dict({"shared": ["sattn"], "blocks": {"sattn": {"kind": "attention",
                                                                    "n_heads": 4}},
                         "schedule": {"layers": ["mamba2", "sattn", "mamba2", "sattn"]}})
    parallel = _from_dict({"blocks": {"hymba": {"kind": "parallel",
                                                "branches": ["attention", "mamba2"]},
                                      "local": {"kind": "attention", "window": 16}},
                           "schedule": {"layers": ["hymba", "local", "hymba"]}})
    shared_parallel = _from_dict({"shared": ["hymba"],
                                  "blocks": {"hymba": {"kind": "parallel",
                                                       "branches": ["attention", "mamba2"]}},
                                  "schedule": {"layers": ["hymba", "mamba2", "hymba"]}})
    return {"default": composer.load_recipe("config", SMALL),
            "deep": composer.load_recipe("config", SMALL + ["model.n_layers=24"]),
            "shared": shared, "parallel": parallel, "shared_parallel": shared_parallel}


@pytest.fixture(scope="module")
def graphs(recipes):
    return {k: composer.layer_graph(r) for k, r in recipes.items()}


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_files(paths, formats=viz.FORMATS):
    assert set(paths) == set(formats)
    for fmt, p in paths.items():
        assert p.name == f"layers.{fmt}" and p.stat().st_size > 0
    if "svg" in paths:
        assert ET.parse(paths["svg"]).getroot().tag.endswith("svg")
    if "png" in paths:
        w, h = png_size(paths["png"])
        assert 300 <= w <= 20000 and 300 <= h <= 20000


# --------------------------------------------------------------------------------------------
def test_table_rows_and_totals(recipes, graphs):
    for name in ("default", "parallel", "shared"):
        g = graphs[name]
        lines = viz.table(g, T).splitlines()
        rules = [i for i, ln in enumerate(lines) if set(ln.replace(" ", "")) == {"-"}]
        assert rules == [1, len(lines) - 2]
        rows = lines[2:-2]
        assert [r.split()[1] for r in rows] == execution_order(g)
        n_params = composer.build_model(recipes[name]).num_params()
        assert sum(a["params"] for _, a in g.nodes(data=True)) == n_params
        assert totals(g, T)["params"] == n_params
        total = lines[-1].split()
        assert total[0] == "total" and viz.human(n_params) in total


def test_table_notes(graphs):
    text = viz.table(graphs["shared"], T)
    assert re.search(r"^\s*\d+\s+L6\s+sattn \(attention\).*shared with L2$", text, re.M)
    assert re.search(r"\bhead\b.*tied to embed$", text, re.M)
    text = viz.table(graphs["parallel"], T)
    assert re.search(r"\bL0\.b1\s+mamba2\b.*branch of L0$", text, re.M)
    assert re.search(r"\bL2\s+local \(attention\).*window=16$", text, re.M)


def test_human_units():
    assert [viz.human(x) for x in (0, 999, 1234, 34_500, 1.2e6, 2.1e9)] == \
        ["0", "999", "1.2K", "34.5K", "1.2M", "2.1G"]
    assert [viz.human_bytes(x) for x in (512, 1536, 3 * 2**20)] == ["512 B", "1.5 KiB",
                                                                   "3.0 MiB"]


def test_colours_fixed_and_hashed():
    assert viz.kind_colour("mamba2") == viz.PALETTE["mamba2"]
    c = viz.kind_colour("some_new_kind")
    assert re.fullmatch(r"#[0-9A-F]{6}", c) and c == viz.kind_colour("some_new_kind")
    assert c != viz.kind_colour("another_kind")


def test_columns_cover_execution_order(graphs):
    g = graphs["deep"]
    cols = viz.columns(g)
    flat = [n for col in cols for slot in col for row in slot for n in row]
    assert flat == execution_order(g) and len(cols) == 4
    assert max(sum(len(s) for s in col) for col in cols) <= 16
    slots = [s for col in viz.columns(graphs["parallel"]) for s in col]
    assert [["L0.b0", "L0.b1"], ["L0"]] in slots


# --------------------------------------------------------------------------------------------
DOT_NODE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" \[label=', re.M)
DOT_EDGE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" -> "((?:[^"\\]|\\.)*)"(?: \[([^\]]*)\])?;$', re.M)


def test_dot_structure(graphs):
    for g in graphs.values():
        text = viz.to_dot(g, T)
        assert text.startswith("digraph layers {") and text.rstrip().endswith("}")
        assert text.count("{") == text.count("}")
        assert sorted(DOT_NODE.findall(text)) == sorted(g.nodes)
        edges = {(u, v): attrs or "" for u, v, attrs in DOT_EDGE.findall(text)}
        for u, v, kind in g.edges(data="kind"):
            if kind == "shares" and g.nodes[u]["op"] == "branch":  # linked at the combine
                assert (u, v) not in edges and f"shared with {u}" in text
            elif kind == "shares":
                assert "style=dashed" in edges[u, v]
            else:
                assert (u, v) in edges and "dashed" not in edges[u, v]
    par = viz.to_dot(graphs["parallel"], T)
    assert 'subgraph "cluster_L0"' in par and '{rank=same; "L0.b0" -> "L0.b1"' in par


def test_dot_and_mermaid_escape_labels(graphs):
    g = graphs["default"].copy()
    g.nodes["L0"]["name"] = 'odd "name" <x> #1 \\ end'
    dot = viz.to_dot(g, T)
    assert '\\"name\\"' in dot and "\\\\ end" in dot
    mmd = viz.to_mermaid(g, T)
    line = next(ln for ln in mmd.splitlines() if ln.strip().startswith("n_L0["))
    inner = line.split('["', 1)[1].rsplit('"]', 1)[0]
    assert '"' not in inner and "<x>" not in inner and "#quot;name#quot;" in inner


def test_mermaid_structure(graphs):
    for g in graphs.values():
        text = viz.to_mermaid(g, T)
        lines = text.splitlines()
        assert lines[0] == "flowchart TB"
        ids = re.findall(r"^\s*(\w+)\[\"", text, re.M)
        assert len(ids) == len(g) and all(re.fullmatch(r"n_\w+", i) for i in ids)
        assert sum(ln.strip().startswith("subgraph ") for ln in lines) == \
            sum(ln.strip() == "end" for ln in lines)
    assert "n_L2 -.->|shares| n_L6" in viz.to_mermaid(graphs["shared"], T)
    text = viz.to_mermaid(graphs["shared_parallel"], T)
    assert "n_L0 -.->|shares| n_L4" in text and "n_L0_b0 -.->" not in text
    text = viz.to_mermaid(graphs["parallel"], T)
    assert 'subgraph sg_n_L0 ["L0 hymba (parallel)"]' in text and "n_L0_b0[" in text


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["deep", "shared", "parallel", "shared_parallel"])
def test_draw_builtin_writes_valid_files(graphs, tmp_path, name):
    paths = viz.draw(graphs[name], tmp_path, T, engine="builtin", title=name)
    check_files(paths)
    if name == "deep":  # 51 nodes in four columns: landscape, not one tall strip
        w, h = png_size(paths["png"])
        assert w > h
    assert name in paths["svg"].read_text()


@pytest.mark.skipif(not HAS_DOT, reason="graphviz `dot` is not installed")
def test_draw_dot_engine(graphs, tmp_path):
    for name in ("deep", "shared_parallel"):
        check_files(viz.draw(graphs[name], tmp_path / name, T, engine="dot"))


def test_dot_engine_missing_raises(graphs, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(HycompError, match="graphviz") as err:
        viz.draw(graphs["default"], tmp_path, T, engine="dot")
    assert "engine=builtin" in err.value.fix and "apt-get install graphviz" in err.value.fix
    paths = viz.draw(graphs["default"], tmp_path, T, formats=("svg",), engine="auto")
    check_files(paths, ("svg",))


def test_dot_failure_falls_back_to_builtin(graphs, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda _name: "/bin/false")
    with pytest.warns(RuntimeWarning, match="builtin"):
        paths = viz.draw(graphs["default"], tmp_path, T, formats=("png", "dot"))
    check_files(paths, ("png", "dot"))


def test_draw_rejects_unknown_format(graphs, tmp_path):
    with pytest.raises(HycompError, match="format"):
        viz.draw(graphs["default"], tmp_path, T, formats=("jpg",))
