"""Stage 3, running a built model: training and what it reads and writes.

:mod:`.train` is the trainer (AdamW, cosine schedule, evaluation, checkpoints, resume);
:mod:`.guards` checks a run before it allocates and while it trains (memory, vocabulary, data,
non-finite steps); :mod:`.control` starts and stops a session (the run folder's lock, SIGINT /
SIGTERM, log lines); :mod:`.resume` picks the checkpoint and recipe a resume continues;
:mod:`.records` writes metrics.jsonl, summary.json and loss.png; :mod:`.data` reads text as
bytes and splits it; :mod:`.checkpoint` writes and verifies safetensors checkpoints that carry
their recipe; :mod:`.runtime` tunes the CPU allocator; :mod:`.plots` draws the loss curves of a
run; :mod:`.app` is the Hydra application behind ``hycomp train`` (unique run folders, sweeps).
"""
