"""Stage 3, running a built model: training, generation, and what they read and write.

:mod:`.train` is the trainer (AdamW, cosine schedule, evaluation, checkpoints, resume);
:mod:`.guards` checks a run before it allocates and while it trains (memory, vocabulary, data,
non-finite steps); :mod:`.control` starts and stops a session (the run folder's lock, SIGINT /
SIGTERM, log lines); :mod:`.resume` picks the checkpoint and recipe a resume continues;
:mod:`.records` writes metrics.jsonl, summary.json and loss.png, :mod:`.loggers` sends its
rows to TensorBoard / W&B; :mod:`.sources` gives the trainer and evaluation their batches, text
(:mod:`.data` reads it as bytes and splits it) or a synthetic task (:mod:`.tasks` generates
them); :mod:`.evaluate` scores a checkpoint (``hycomp eval``); :mod:`.compare`,
:mod:`.compare_table` and :mod:`.compare_plots` put runs side by side (``hycomp compare``);
:mod:`.checkpoint` writes and verifies safetensors checkpoints that carry
their recipe; :mod:`.runtime` picks the device and tunes the CPU allocator; :mod:`.plots`
draws the loss curves of a run; :mod:`.generate` loads a run's model and writes what it
generates (``hycomp generate``, the sample at the end of a run); :mod:`.app` is the Hydra
application behind ``hycomp train`` (unique run folders, sweeps).
"""
