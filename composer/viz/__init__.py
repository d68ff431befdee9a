"""Stage 3, pictures of the layer graph: what ``hycomp viz`` and ``hycomp check`` show.

:mod:`.labels` holds what every picture shares (colours, numbers, node labels, the column
layout); :mod:`.text` the terminal table and summary and the DOT and Mermaid sources;
:mod:`.draw` writes the picture files, rendering SVG/PNG with Graphviz when ``dot`` is
installed and otherwise with the matplotlib renderer of :mod:`.builtin`.
"""
from composer.viz.draw import ENGINES, FORMATS, draw
from composer.viz.labels import PALETTE, columns, human, human_bytes, kind_colour
from composer.viz.text import summary, table, to_dot, to_mermaid

__all__ = ["ENGINES", "FORMATS", "PALETTE", "columns", "draw", "human", "human_bytes",
           "kind_colour", "summary", "table", "to_dot", "to_mermaid"]
