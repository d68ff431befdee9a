"""Picture files: :func:`draw` writes SVG, PNG, Mermaid and DOT for a layer graph.

SVG and PNG come from graphviz ``dot`` when it is installed (``engine="auto"``) and otherwise
from the builtin matplotlib renderer (:mod:`composer.viz.builtin`), which needs no binary and
stays readable for deep models by laying the sub-layers out in columns.
"""
from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import networkx as nx

from composer.core.errors import HycompError
from composer.viz.text import to_dot, to_mermaid


FORMATS = ("svg", "png", "mmd", "dot")

ENGINES = ("auto", "dot", "builtin")

def out_folder(out_dir) -> Path:
    """``out_dir``, created if needed; a path that is (or runs through) a file is an error."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        hit = next((p for p in [out_dir, *out_dir.parents] if p.exists()), out_dir)
        raise HycompError(f"cannot use {str(out_dir)!r} as the output folder", where="-o",
                          why=(f"{str(hit)!r} exists and is not a folder" if not hit.is_dir()
                               else e.strerror or str(e)),
                          fix="give -o a folder (new or existing), e.g. -o viz") from None
    return out_dir


def draw(g: nx.DiGraph, out_dir: Path, T: int, formats=FORMATS, engine: str = "auto",
         title: str | None = None) -> dict[str, Path]:
    """Write ``layers.<fmt>`` for each of ``formats`` into ``out_dir``; return fmt -> path.

    ``engine``: ``dot`` renders SVG/PNG with graphviz, ``builtin`` with matplotlib, ``auto``
    with graphviz when its ``dot`` binary is on the PATH. If ``dot`` fails, the builtin
    renderer takes over with a warning; ``engine="dot"`` without graphviz installed raises
    :class:`HycompError`. DOT and Mermaid text are written whatever the engine.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or engine not in ENGINES:
        raise HycompError(f"unknown {'format ' + bad[0] if bad else 'engine ' + repr(engine)}",
                          where="viz", why=f"formats: {', '.join(FORMATS)}; engines: "
                          f"{', '.join(ENGINES)}", fix="pick from those")
    dot_bin = shutil.which("dot")
    if engine == "dot" and dot_bin is None:
        raise HycompError("graphviz `dot` is not installed", where="engine=dot",
                          why="the dot engine runs graphviz's `dot` binary, not on the PATH",
                          fix="install graphviz (apt-get install graphviz, brew install "
                              "graphviz, conda install graphviz), or use engine=builtin")
    out_dir = out_folder(out_dir)
    paths = {f: out_dir / f"layers.{f}" for f in formats}
    dot_text = to_dot(g, T, title)
    if "dot" in paths:
        paths["dot"].write_text(dot_text, encoding="utf-8")
    if "mmd" in paths:
        paths["mmd"].write_text(to_mermaid(g, T, title), encoding="utf-8")
    images = {f: p for f, p in paths.items() if f in ("svg", "png")}
    if images and engine != "builtin" and dot_bin is not None:
        try:
            for fmt, p in images.items():
                dpi = ["-Gdpi=120"] if fmt == "png" else []
                subprocess.run([dot_bin, f"-T{fmt}", *dpi, "-o", str(p)],
                               input=dot_text.encode(), capture_output=True, check=True,
                               timeout=120)
            return paths
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", None)
            detail = detail.decode(errors="replace").strip() if detail else str(err)
            warnings.warn(f"graphviz dot failed ({detail[:200]}); drawing with the builtin "
                          "renderer", RuntimeWarning, stacklevel=2)
    if images:
        from composer.viz.builtin import render  # matplotlib loads only when it draws
        render(g, T, images, title)
    return paths
