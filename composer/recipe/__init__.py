"""Stage 1, the recipe language: YAML + overrides in, a validated :class:`Recipe` out.

:mod:`.files` reads a user's recipe file (a root config, a model section alone, or a
checkpoint's recipe.json) into a root config; :mod:`.compose` composes the Hydra config tree
(``recipes/``) with command-line overrides into a plain dict; :mod:`.schema` holds the Pydantic models of that dict (pure data, every key
documented); :mod:`.schedule` expands the four schedule forms (ratio, pattern, explicit list,
segments) with the placements of :mod:`.placement` into one entry per residual sub-layer;
:mod:`.validate` runs both, and :mod:`.problems` turns every problem into one error with key
path, value, reason and fix. Imports only :mod:`composer.core`.
"""
