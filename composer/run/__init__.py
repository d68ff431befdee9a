"""Stage 3, running a built model: training and what it reads and writes.

:mod:`.train` is the trainer (AdamW, cosine schedule, evaluation, checkpoints, resume);
:mod:`.data` reads text as bytes and splits it; :mod:`.checkpoint` writes and verifies
safetensors checkpoints that carry their recipe; :mod:`.runtime` tunes the CPU allocator;
:mod:`.plots` draws the loss curves of a run; :mod:`.app` is the Hydra application behind
``hycomp train`` (run folders, sweeps).
"""
