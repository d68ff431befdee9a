"""Stage 2, the build: a validated recipe becomes a layer graph, then a module.

:mod:`.graph` lays out the ``networkx`` graph of the schedule (embed → sub-layers, parallel
branches, shared visits → norm → head) with FLOPs and state bytes per node; :mod:`.model`
compiles a graph into ``ComposedModel`` (blocks from the registry, a flat execution plan);
:mod:`.costs` owns parameter counting (it builds the model on the meta device) and gives the
public :func:`layer_graph`. Imports :mod:`composer.core` and :mod:`composer.recipe` only.
"""
