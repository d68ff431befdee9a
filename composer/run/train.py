"""The training loop: ``run(recipe, run_dir) -> summary``.

Per optimizer step ``s`` (0-based): ``grad_accum`` micro-batches of ``batch_size`` sequences of
``seq_len`` tokens from the recipe's data source (:mod:`composer.run.sources`: random windows of
text, or synthetic task sequences); loss = mean next-token cross-entropy over the scored
positions (every position of text, the answers of a task; nats, computed in fp32), each
micro-batch's loss divided by ``grad_accum`` before ``backward`` (so the gradient is that of the
mean); the global gradient norm clipped to ``grad_clip``; an AdamW update at ``lr_at(s)``.

* Weight decay: on parameters with 2 or more dimensions (linear and convolution weights), not
  on embeddings (found by module type, so the tied head is spared too), norms or biases.
* Learning rate: linear warm-up, then cosine decay to ``lr * min_lr_ratio`` (:func:`lr_at`). It
  is a function of the step alone, so the step is the whole scheduler state.
* bf16: ``torch.autocast`` with bfloat16 around the forward; weights, optimizer and loss fp32.
* Validation: text — mean loss over ``eval_batches`` fixed batches, bits per byte = loss /
  ln 2; a task — loss and accuracy over every scored token of its fixed test set.

Run folder: ``metrics.jsonl`` (one strict JSON object per line, all with ``step``: the baseline
once (unigram bits per byte, or a task's chance accuracy), train lines every ``log_every``
steps, validation lines every ``eval_every`` steps and at the end; a NaN or infinite value is
written ``null``; ``train.logger`` sends the same rows to TensorBoard / W&B), ``checkpoints/``
(:mod:`composer.run.checkpoint`), ``loss.png`` and ``summary.json`` (with ``status``) at the end;
progress lines go to the ``composer.run`` logger (``train.log`` under Hydra). One process at a
time trains a folder (:func:`composer.run.control.run_lock`).

Non-finite steps: a step whose loss or gradient norm is NaN or infinite is not applied (a
warning; counted as ``skipped_steps`` in the train rows and the summary); ``train.max_bad_steps``
of them in a row stop the run with :class:`~composer.run.guards.NonFiniteError` (exit code 3)
and no checkpoint of the diverged weights. A model holding NaN is never checkpointed.

Stops: the first Ctrl-C or SIGTERM lets the current step finish, writes a checkpoint and raises
``KeyboardInterrupt``; a second one interrupts at once. Any stop (interrupt, an exception)
checkpoints the last completed step unless it landed inside an optimizer update or the run
diverged, then writes ``loss.png`` and ``summary.json`` with ``status`` interrupted / failed /
stopped_nonfinite.
``train.resume=<run folder>`` continues from the latest checkpoint with the same losses an
uninterrupted run has (weights, AdamW moments, step, and the batch and torch RNG states are
restored).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from composer.run.checkpoint import (NonFiniteCheckpointError, load_checkpoint,
                                     save_checkpoint, write_text_atomic)
from composer.run.control import run_lock, say, stop_signals
from composer.run.generate import printable, training_sample
from composer.run.data import BITS_PER_NAT
from composer.run.sources import autocast, evaluate, open_source, token_loss
from composer.core.errors import CheckpointError
from composer.run.guards import (NonFiniteError, check_before_training, check_data, finite,
                                 json_safe)
from composer.run.loggers import MetricSinks, check_sinks
from composer.run.records import append_metrics, metrics_line, read_metrics, write_records
from composer.run.resume import run_folder
from composer.run.runtime import pick_device, tune_cpu_allocator


def lr_at(step: int, cfg) -> float:
    """Learning rate of optimizer step ``step`` (0-based), W = warmup_steps, S = steps:
    ``lr * (step + 1) / W`` while ``step < W``; then with ``p = (step - W) / max(1, S - W)``
    (capped at 1): ``lr * (r + (1 - r) * (1 + cos(pi p)) / 2)``, r = min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: ``[{decayed: >= 2-D, not embeddings}, {the rest, weight_decay 0}]``."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, dtype: str):
    """Mean cross-entropy (nats) of logits (B, T, V) against targets (B, T) over the scored
    positions (every position for text), in fp32."""
    with autocast(device, dtype):
        logits = model(x.to(device))
    return token_loss(logits, y.to(device))


def _gradients(model: nn.Module, params: list, source, gen: torch.Generator, cfg,
               device: torch.device) -> tuple[float, float]:
    """Fill ``.grad`` for one optimizer step: ``grad_accum`` micro-batches of ``batch_size``
    sequences from ``source``, each loss / grad_accum back-propagated; then clip the global
    norm to ``grad_clip``. Blocks' auxiliary losses (``model.aux_loss``, e.g. MoE load
    balancing) are added to what is back-propagated, not to the reported loss. Returns (mean
    loss in nats, global gradient norm before clipping)."""
    for p in params:
        p.grad = None
    loss = 0.0
    for _ in range(cfg.grad_accum):
        x, y = source.batch(cfg.batch_size, gen)
        micro = _loss(model, x, y, device, cfg.dtype)
        aux = getattr(model, "aux_loss", None)
        ((micro if aux is None else micro + aux) / cfg.grad_accum).backward()
        loss += micro.item() / cfg.grad_accum
    return loss, nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf).item()


# The TrainState fields a checkpoint's trainer.json records and a resume restores, in the order
# they are written.
_TRAINER_FIELDS = ("step", "tokens", "elapsed", "train_loss", "val_loss", "val_step",
                   "best_val_loss", "skipped_steps", "val_acc", "best_val_acc")


@dataclass
class TrainState:
    """One training session: what :func:`_setup` builds, and what the steps of :func:`run` read
    and change."""
    recipe: Any
    run_dir: Path
    metrics: Path                      # run_dir / metrics.jsonl
    device: torch.device
    source: Any                        # TextSource | TaskSource (composer.run.sources)
    val_batches: list                  # fixed validation batches
    baseline: dict                     # unigram_bpb (text) or chance_acc (task), split sizes
    model: nn.Module
    opt: torch.optim.Optimizer
    params: list                       # every parameter the optimizer updates (for clipping)
    n_params: int
    gen: torch.Generator               # draws the training batches
    t0: float                          # perf_counter at the start of this session
    # Progress, saved in trainer.json (_TRAINER_FIELDS); elapsed: wall seconds over all sessions.
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    train_loss: float | None = None
    val_loss: float | None = None
    val_step: int | None = None
    best_val_loss: float | None = None
    skipped_steps: int = 0             # steps not applied: non-finite loss or gradient
    val_acc: float | None = None       # tasks: accuracy on the scored test positions
    best_val_acc: float | None = None
    # This session only.
    bad_steps: int = 0                 # non-finite steps in a row, up to this one
    elapsed0: float = 0.0              # elapsed when this session started
    train_time: float = 0.0            # seconds inside optimizer steps
    session_tokens: int = 0
    tokens_per_s: float = 0.0          # session_tokens / train_time after the last step
    saved_step: int | None = None      # step of the newest checkpoint written or resumed from
    snapshot: dict = field(default_factory=dict)  # RNG states as of the last completed step
    updating: bool = False             # inside an optimizer update: nothing consistent to save
    interrupted: bool = False          # set by the first Ctrl-C or SIGTERM (stop_signals)
    stop_signal: str | None = None     # which one
    bar: Any = None                    # the tqdm progress bar
    sinks: Any = None                  # MetricSinks: train.logger's TensorBoard / W&B
    overrides: list = field(default_factory=list)  # the command line's overrides (Hydra's)
    label: str = ""                    # what names this run in titles and comparisons

    @property
    def cfg(self):
        return self.recipe.train

    def due(self, every: int) -> bool:
        """Whether a cadence of ``every`` steps fires at this step (the last step always does)."""
        return self.step % every == 0 or self.step == self.cfg.steps


def _setup(recipe, run_dir: Path, ckpt: Path | None) -> TrainState:
    """Device, checks (:func:`~composer.run.guards.check_before_training`: nothing allocated
    yet), threads, data, seeded model and optimizer, then either the resumed checkpoint or a
    fresh metrics.jsonl (its first row: the baseline); opens the bar."""
    import composer

    t0 = time.perf_counter()
    cfg = recipe.train
    device = pick_device(cfg.device)
    check_before_training(recipe, device)
    check_sinks(cfg.logger)
    if cfg.warmup_steps >= cfg.steps:
        say(f"warning: train.warmup_steps={cfg.warmup_steps} >= train.steps={cfg.steps}: the "
            f"learning rate never reaches train.lr and never decays", warn=True)
    if device.type == "cpu":
        tune_cpu_allocator()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    source = open_source(recipe.data)
    if not source.is_task:
        warning = check_data(recipe, source.train, source.val)
        if warning:
            say(warning, warn=True)
    val_batches = source.eval_batches(cfg.eval_batches, cfg.batch_size)

    torch.manual_seed(cfg.seed)
    model = composer.build_model(recipe).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2))
    st = TrainState(recipe=recipe, run_dir=run_dir, metrics=run_dir / "metrics.jsonl",
                    device=device, source=source, val_batches=val_batches,
                    baseline=source.baseline(), model=model, opt=opt,
                    params=[p for g in opt.param_groups for p in g["params"]],
                    n_params=sum(p.numel() for p in model.parameters()),
                    gen=torch.Generator().manual_seed(cfg.seed), t0=t0)
    if ckpt is not None:
        _resume(st, ckpt)
    else:
        st.metrics.write_text(metrics_line({"step": 0, **st.baseline, "params": st.n_params}))
    st.elapsed0 = st.elapsed
    st.snapshot = _rng_states(st)
    st.bar = tqdm(total=cfg.steps, initial=min(st.step, cfg.steps), disable=not cfg.progress,
                  file=sys.stderr, unit="step", dynamic_ncols=True)
    return st


def _resume(st: TrainState, ckpt: Path) -> None:
    """Load weights, AdamW moments, progress and RNG states from ``ckpt``; drop the metrics rows
    written after its step."""
    loaded = load_checkpoint(ckpt, st.model, st.opt)
    for k in _TRAINER_FIELDS:
        if k in loaded["trainer"]:
            setattr(st, k, loaded["trainer"][k])
    rng = loaded["rng"]
    if not {"batches", "torch"} <= set(rng):
        raise CheckpointError(what="checkpoint lacks the RNG states", where=str(ckpt),
                              why=f"optim.safetensors holds rng.{sorted(rng)}",
                              fix="start a new run (train.resume=null)")
    st.gen.set_state(rng["batches"])
    torch.set_rng_state(rng["torch"])
    if st.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], st.device)
    write_text_atomic(st.metrics, "".join(metrics_line(r) for r in read_metrics(st.metrics)
                                          if r.get("step", 0) <= st.step))
    st.saved_step = st.step


def _rng_states(st: TrainState) -> dict[str, torch.Tensor]:
    out = {"batches": st.gen.get_state(), "torch": torch.get_rng_state()}
    if st.device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(st.device)
    return out


def _train_step(st: TrainState) -> None:
    """One optimizer step at ``lr_at(step)`` (not applied when the loss or gradient is not
    finite); advance the bar; a train row every ``log_every``."""
    cfg, seq_len = st.cfg, st.recipe.data.seq_len
    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len
    t = time.perf_counter()
    lr = lr_at(st.step, cfg)
    for g in st.opt.param_groups:
        g["lr"] = lr
    loss, grad_norm = _gradients(st.model, st.params, st.source, st.gen, cfg, st.device)
    st.updating = True
    if finite(loss) and finite(grad_norm):
        st.opt.step()
        st.bad_steps = 0
    else:
        _skip(st, loss, grad_norm)
    st.step += 1
    st.tokens += tokens_per_step
    st.train_loss = loss
    st.snapshot = _rng_states(st)
    st.updating = False
    st.train_time += time.perf_counter() - t
    st.session_tokens += tokens_per_step
    st.tokens_per_s = st.session_tokens / st.train_time
    st.bar.update(1)
    st.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{st.tokens_per_s:,.0f}")
    if st.due(cfg.log_every):
        _log(st, {"step": st.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": st.tokens, "tokens_per_s": st.tokens_per_s,
                  "elapsed": st.elapsed0 + time.perf_counter() - st.t0,
                  "skipped_steps": st.skipped_steps})
        say(f"step {st.step}/{cfg.steps}  loss {loss:.4f}  lr {lr:.3g}  grad_norm "
            f"{grad_norm:.3g}  {st.tokens_per_s:,.0f} tok/s  skipped {st.skipped_steps}")
    if st.bad_steps >= cfg.max_bad_steps:
        _diverged(st)


def _skip(st: TrainState, loss: float, grad_norm: float) -> None:
    """Drop the gradients of a non-finite step instead of applying them."""
    for p in st.params:
        p.grad = None
    st.bad_steps += 1
    st.skipped_steps += 1
    say(f"warning: step {st.step + 1}: loss {loss}, gradient norm {grad_norm}: not finite, "
        f"optimizer step skipped ({st.bad_steps} in a row; the run stops at "
        f"train.max_bad_steps={st.cfg.max_bad_steps})", warn=True)


def _diverged(st: TrainState) -> None:
    first = st.step - st.bad_steps + 1
    good = (f"the last checkpoint (step {st.saved_step}) is kept: resume it with "
            f"train.resume={st.run_dir} and a lower train.lr, or " if st.saved_step else "")
    raise NonFiniteError(
        what=f"training diverged: {st.bad_steps} steps in a row with a non-finite loss or "
             f"gradient",
        where=f"steps {first}..{st.step}, train.lr={st.cfg.lr}",
        why="the loss or gradient norm was NaN or infinite at each; their updates were skipped "
            "and the weights they came from are not checkpointed",
        fix=good + "lower train.lr / raise train.warmup_steps (train.max_bad_steps sets how "
                   "many such steps in a row stop a run)")


def _log(st: TrainState, row: dict) -> None:
    """One metrics row: to metrics.jsonl (the record), then to ``train.logger``'s sinks."""
    append_metrics(st.metrics, row)
    if st.sinks is not None:
        st.sinks.log(row)


def _validate(st: TrainState) -> None:
    task = st.source.is_task
    scores = evaluate(st.model, st.val_batches, st.device, st.cfg.dtype, accuracy=task)
    st.val_loss, st.val_step = scores.loss, st.step
    if finite(st.val_loss) and (st.best_val_loss is None or st.val_loss < st.best_val_loss):
        st.best_val_loss = st.val_loss
    if task:
        st.val_acc = scores.accuracy
        if st.val_acc is not None and (st.best_val_acc is None or st.val_acc > st.best_val_acc):
            st.best_val_acc = st.val_acc
        _log(st, {"step": st.step, "val_loss": st.val_loss, "val_acc": st.val_acc})
        say(f"step {st.step}/{st.cfg.steps}  validation loss {st.val_loss:.4f}  accuracy "
            f"{st.val_acc:.1%}")
    else:
        _log(st, {"step": st.step, "val_loss": st.val_loss, "val_bpb": scores.bpb})
        say(f"step {st.step}/{st.cfg.steps}  validation {scores.bpb:.4f} bits/byte")


def _val_postfix(st: TrainState) -> dict:
    if st.source.is_task:
        return {"val_acc": f"{st.val_acc:.1%}" if st.val_acc is not None else "-"}
    return {"val_bpb": f"{st.val_loss * BITS_PER_NAT:.3f}"}


def _maybe_evaluate(st: TrainState) -> None:
    if st.due(st.cfg.eval_every):
        _validate(st)
        st.bar.set_postfix(loss=f"{st.train_loss:.3f}", tok_s=f"{st.tokens_per_s:,.0f}",
                           **_val_postfix(st))


def _save(st: TrainState) -> None:
    """Checkpoint this step with the RNG states as of its end. Not while the last step was not
    finite (its weights give NaN), nor a model holding NaN or infinity: a warning, and the
    earlier checkpoints stay."""
    st.elapsed = st.elapsed0 + time.perf_counter() - st.t0
    if st.bad_steps:
        say(f"warning: step {st.step}: no checkpoint: the last {st.bad_steps} step(s) had a "
            "non-finite loss or gradient", warn=True)
        return
    try:
        save_checkpoint(st.run_dir, st.step, st.model, st.opt,
                        json_safe({k: getattr(st, k) for k in _TRAINER_FIELDS}),
                        st.recipe.model_dump(mode="json"), st.snapshot,
                        keep=st.cfg.keep_checkpoints)
    except NonFiniteCheckpointError as e:
        say(f"warning: step {st.step}: no checkpoint: {e.why}", warn=True)
        return
    st.saved_step = st.step


def _maybe_checkpoint(st: TrainState) -> None:
    if st.due(st.cfg.ckpt_every):
        _save(st)


def _status(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return "stopped_nonfinite" if isinstance(e, NonFiniteError) else "failed"


def _on_stop(st: TrainState, e: BaseException) -> None:
    """Checkpoint the last completed step, unless the stop landed inside an optimizer update or
    the run diverged; then write loss.png and summary.json with the status."""
    st.bar.close()
    status = _status(e)
    if status == "stopped_nonfinite":
        pass
    elif st.updating:
        say("stopped inside an optimizer update: no checkpoint written for it", warn=True)
    elif st.saved_step != st.step:
        try:
            _save(st)
        except Exception as err:  # noqa: BLE001 - the original error is the one to report
            say(f"warning: no checkpoint written at the stop: {err}", warn=True)
    if st.saved_step is not None:
        say(f"stopped at step {st.step} ({status}); the last checkpoint is step "
            f"{st.saved_step}: continue with train.resume={st.run_dir}", warn=True)
    error = (e.render() if hasattr(e, "render") else f"{type(e).__name__}: {e}"
             if status == "failed" else st.stop_signal or "KeyboardInterrupt")
    _record(st, status, error=error)


def _record(st: TrainState, status: str, error: str | None = None) -> dict:
    """Write loss.png and summary.json (:mod:`composer.run.records`); return the summary."""
    task = st.recipe.data.task
    summary = {"status": status, "run_dir": str(st.run_dir), "label": st.label, "task": task,
               "schedule": st.recipe.schedule.pattern, "overrides": st.overrides,
               "steps": st.step, "tokens": st.tokens, "train_loss": st.train_loss,
               "val_loss": st.val_loss, "best_val_loss": st.best_val_loss}
    if st.source.is_task:
        summary.update(val_acc=st.val_acc, best_val_acc=st.best_val_acc,
                       chance_acc=st.baseline["chance_acc"])
    else:
        summary.update(val_bpb=None if st.val_loss is None else st.val_loss * BITS_PER_NAT,
                       unigram_bpb=st.baseline["unigram_bpb"])
    summary.update({"tokens_per_s": st.session_tokens / st.train_time if st.train_time else None,
                    "wall_s": time.perf_counter() - st.t0, "params": st.n_params,
                    "device": str(st.device), "skipped_steps": st.skipped_steps,
                    "last_checkpoint": st.saved_step})
    if error is not None:
        summary["error"] = error
    what = f"{task}, " if st.source.is_task else ""
    return write_records(st.run_dir, st.metrics, summary,
                         title=f"{st.label}\n{what}{st.n_params / 1e6:.2f}M parameters")


def _finish(st: TrainState) -> dict:
    """Validate and checkpoint the last step if not done yet; write loss.png and summary.json;
    print the verdict against the unigram baseline. Returns the summary."""
    st.bar.close()
    if st.val_step != st.step:
        _validate(st)
    if st.saved_step != st.step:
        _save(st)
    summary = _record(st, "completed")
    if st.source.is_task:
        chance = st.baseline["chance_acc"]
        line = (f"step {st.step}: {st.recipe.data.task} test accuracy {st.val_acc:.1%} "
                f"(chance {chance:.1%}), loss {st.val_loss:.3f}; run folder {st.run_dir}")
    else:
        val_bpb, uni = st.val_loss * BITS_PER_NAT, st.baseline["unigram_bpb"]
        verdict = "below" if val_bpb < uni else "NOT below"
        line = (f"step {st.step}: validation {val_bpb:.3f} bits/byte, {verdict} the unigram "
                f"baseline {uni:.3f}; run folder {st.run_dir}")
    print(line)
    say(line)
    if not st.source.is_task:
        _sample(st)
    return summary


def _sample(st: TrainState) -> None:
    """Print what the trained model writes after the start of the validation text
    (``train.sample_tokens`` bytes, greedy) and save it to sample.txt. Only after a completed
    run, and never its undoing: a failure (or Ctrl-C) is a one-line note."""
    if not st.cfg.sample_tokens:
        return
    try:
        prompt, text = training_sample(st.model, st.val_batches[0][0][0], st.cfg.sample_tokens)
        write_text_atomic(st.run_dir / "sample.txt", prompt + text + "\n")
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the run itself is done
        say(f"note: no sample from the trained model ({type(e).__name__}: {e})", warn=True)
        return
    head = (f"sample: the model continues the first {len(prompt.encode())} bytes of the "
            f"validation text (greedy; also in {st.run_dir / 'sample.txt'}):")
    tty = bool(getattr(sys.stdout, "isatty", lambda: False)())
    print(f"{head}\n{printable(prompt + text) if tty else prompt + text}")
    say(f"{head}\n{prompt + text}")


def run(recipe, run_dir: Path, overrides: list[str] | None = None,
        label: str | None = None) -> dict:
    """Train ``recipe`` in ``run_dir`` (or continue ``train.resume``); return the summary
    (also written to ``summary.json``): status, run_dir, label, task, schedule (the pattern,
    one symbol per sub-layer), overrides, steps, tokens, train_loss, val_loss (nats),
    best_val_loss, then val_bpb and unigram_bpb (text) or val_acc, best_val_acc and chance_acc
    (a task), tokens_per_s, wall_s, params, device, skipped_steps, last_checkpoint.
    ``overrides`` (the command line's) and ``label`` (default: the folder's name) are recorded
    for comparisons and titles. A stop raises (``KeyboardInterrupt``,
    :class:`~composer.run.guards.NonFiniteError`, ...) after checkpointing and writing
    summary.json (with the stop's status) and loss.png."""
    run_dir, ckpt = run_folder(recipe, run_dir)
    with run_lock(run_dir):
        st = _setup(recipe, run_dir, ckpt)
        st.overrides, st.label = list(overrides or []), label or run_dir.name
        if st.cfg.logger:
            st.sinks = MetricSinks(st.cfg.logger, run_dir, recipe.model_dump(mode="json"),
                                   st.label, start_step=st.step if ckpt is not None else 0)
            if ckpt is None:
                st.sinks.log(read_metrics(st.metrics)[0])
        try:
            try:
                with stop_signals(st):
                    while st.step < st.cfg.steps:
                        if st.interrupted:
                            raise KeyboardInterrupt
                        _train_step(st)
                        _maybe_evaluate(st)
                        _maybe_checkpoint(st)
            except BaseException as e:
                _on_stop(st, e)
                raise
            return _finish(st)
        finally:
            if st.sinks is not None:
                st.sinks.close()
