"""Stage 0, the contract every later stage and every block plugs into.

The error type every stage raises (:mod:`.errors`: what, where, why, fix); the block contract
(:mod:`.block`: a Pydantic spec plus an ``nn.Module`` with ``forward``/``init_state``/``step``
and cost hooks); the registries of block types and op backends (:mod:`.registry`); calling an op
by name with the backend the recipe chose (:mod:`.kernels`); the RMSNorm every model uses
(:mod:`.norms`); auxiliary losses from blocks to the trainer (:mod:`.aux`). Nothing here knows
recipes, graphs or training: block authors import from this package alone.
"""
