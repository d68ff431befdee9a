"""Stage 3, pictures of the layer graph: what ``hycomp viz`` and ``hycomp check`` show.

:mod:`.draw` holds the text table and summary, labels and layout shared by every picture, the
DOT and Mermaid sources and :func:`draw`, which renders with Graphviz when ``dot`` is installed
and otherwise with the matplotlib renderer of :mod:`.builtin`.
"""
