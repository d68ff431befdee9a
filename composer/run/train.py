"""The training loop: ``run(recipe, run_dir) -> summary``.

Per optimizer step ``s`` (0-based): ``grad_accum`` micro-batches of ``batch_size`` random windows
of ``seq_len`` bytes; loss = mean next-byte cross-entropy (nats, computed in fp32), each
micro-batch's loss divided by ``grad_accum`` before ``backward`` (so the gradient is that of the
mean); the global gradient norm clipped to ``grad_clip``; an AdamW update at ``lr_at(s)``.

* Weight decay: on parameters with 2 or more dimensions (linear and convolution weights), not
  on embeddings (found by module type, so the tied head is spared too), norms or biases.
* Learning rate: linear warm-up, then cosine decay to ``lr * min_lr_ratio`` (:func:`lr_at`). It
  is a function of the step alone, so the step is the whole scheduler state.
* bf16: ``torch.autocast`` with bfloat16 around the forward; weights, optimizer and loss fp32.
* Validation: mean loss over ``eval_batches`` fixed batches; bits per byte = loss / ln 2.

Run folder: ``metrics.jsonl`` (one JSON object per line, all with ``step``: the unigram
baseline once, train lines every ``log_every`` steps, validation lines every ``eval_every``
steps and at the end), ``checkpoints/`` (:mod:`composer.run.checkpoint`), ``loss.png`` and
``summary.json`` at the end.

Ctrl-C: the first one lets the current step finish, writes a checkpoint and raises
``KeyboardInterrupt``; a second one interrupts at once (a checkpoint is still written unless
it lands inside an optimizer update). ``train.resume=<run folder>`` continues from the latest
checkpoint with the same losses an uninterrupted run has (weights, AdamW moments, step, and the
batch and torch RNG states are restored).
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from composer.run.checkpoint import (CKPT_DIR, latest_checkpoint, load_checkpoint, read_recipe,
                                 save_checkpoint, write_text_atomic)
from composer.run.data import (BITS_PER_NAT, check_split, fixed_batches, load_splits, sample_batch,
                           unigram_bpb)
from composer.core.errors import CheckpointError, RecipeError
from composer.run.plots import plot_losses
from composer.run.runtime import tune_cpu_allocator


def pick_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu; otherwise the named device, which must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise RecipeError(what=f"unknown device {name!r}", where="train.device", why=str(e),
                          fix="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(what="no CUDA device", where=f"train.device={name}",
                          why="torch sees no GPU on this machine",
                          fix="use train.device=auto or train.device=cpu")
    return dev


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


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, dtype: str):
    """Mean cross-entropy (nats) of logits (B, T, V) against targets (B, T), in fp32."""
    with _autocast(device, dtype):
        logits = model(x.to(device))
    return F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())


def _gradients(model: nn.Module, params: list, train: torch.Tensor, gen: torch.Generator, cfg,
               seq_len: int, device: torch.device) -> tuple[float, float]:
    """Fill ``.grad`` for one optimizer step: ``grad_accum`` micro-batches (batch_size,
    seq_len), each loss / grad_accum back-propagated; then clip the global norm to
    ``grad_clip``. Blocks' auxiliary losses (``model.aux_loss``, e.g. MoE load balancing) are
    added to what is back-propagated, not to the reported loss. Returns (mean loss in nats,
    global gradient norm before clipping)."""
    for p in params:
        p.grad = None
    loss = 0.0
    for _ in range(cfg.grad_accum):
        x, y = sample_batch(train, cfg.batch_size, seq_len, gen)
        micro = _loss(model, x, y, device, cfg.dtype)
        aux = getattr(model, "aux_loss", None)
        ((micro if aux is None else micro + aux) / cfg.grad_accum).backward()
        loss += micro.item() / cfg.grad_accum
    return loss, nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf).item()


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, dtype: str = "fp32") -> float:
    """Mean validation loss (nats per byte) over fixed ``batches``."""
    model.eval()
    try:
        return sum(_loss(model, x, y, device, dtype).item() for x, y in batches) / len(batches)
    finally:
        model.train()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (none when it does not exist)."""
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _flatten(d, prefix: str) -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, sub in d.items() for k, v in _flatten(sub, f"{prefix}.{key}").items()}


def check_resumable(recipe, saved: dict, ckpt: Path) -> None:
    """Raise :class:`CheckpointError` listing the keys where the ``model`` or ``data`` section
    of ``recipe`` differs from the recipe the checkpoint was written with."""
    now = json.loads(json.dumps(recipe.model_dump(mode="json")))
    diffs = []
    for section in ("model", "data"):
        old, new = _flatten(saved.get(section), section), _flatten(now[section], section)
        diffs += [f"{k}: {old.get(k, '(absent)')!r} in the run, {new.get(k, '(absent)')!r} now"
                  for k in sorted(set(old) | set(new)) if old.get(k, ...) != new.get(k, ...)]
    if diffs:
        more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
        raise CheckpointError(
            what="the recipe's model/data sections differ from the run being resumed",
            where=str(ckpt), why="; ".join(diffs[:8]) + more,
            fix="drop the overrides that change model.* or data.* (train.* may change, e.g. "
                "a larger train.steps), or start a new run without train.resume")


@contextlib.contextmanager
def _sigint_sets(state):
    """While active, the first SIGINT sets ``state.interrupted`` instead of raising; the handler
    then steps aside so a second one raises ``KeyboardInterrupt`` at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:
        previous = signal.default_int_handler

    def handler(signum, frame):
        state.interrupted = True
        signal.signal(signal.SIGINT, previous)
        print("\ninterrupt: finishing this step, then writing a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# The TrainState fields a checkpoint's trainer.json records and a resume restores, in the order
# they are written.
_TRAINER_FIELDS = ("step", "tokens", "elapsed", "train_loss", "val_loss", "val_step",
                   "best_val_loss")


@dataclass
class TrainState:
    """One training session: what :func:`_setup` builds, and what the steps of :func:`run` read
    and change."""
    recipe: Any
    run_dir: Path
    metrics: Path                      # run_dir / metrics.jsonl
    device: torch.device
    train: torch.Tensor                # training bytes
    val_batches: list                  # fixed validation batches
    unigram_bpb: float
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
    # This session only.
    elapsed0: float = 0.0              # elapsed when this session started
    train_time: float = 0.0            # seconds inside optimizer steps
    session_tokens: int = 0
    tokens_per_s: float = 0.0          # session_tokens / train_time after the last step
    saved_step: int | None = None      # step of the newest checkpoint written or resumed from
    snapshot: dict = field(default_factory=dict)  # RNG states as of the last completed step
    updating: bool = False             # inside an optimizer update: nothing consistent to save
    interrupted: bool = False          # set by the first Ctrl-C (_sigint_sets)
    bar: Any = None                    # the tqdm progress bar

    @property
    def cfg(self):
        return self.recipe.train

    def due(self, every: int) -> bool:
        """Whether a cadence of ``every`` steps fires at this step (the last step always does)."""
        return self.step % every == 0 or self.step == self.cfg.steps


def _run_folder(recipe, run_dir) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume or None): ``train.resume``'s folder and its latest
    checkpoint, which must fit the recipe; otherwise ``run_dir``, which must hold none."""
    if recipe.train.resume:
        run_dir = Path(recipe.train.resume)
        ckpt = latest_checkpoint(run_dir)
        check_resumable(recipe, read_recipe(ckpt), ckpt)
        return run_dir, ckpt
    run_dir = Path(run_dir)
    if any((run_dir / CKPT_DIR).glob("step_*")):
        raise CheckpointError(what="the run folder already holds checkpoints",
                              where=str(run_dir), why="a new run would mix with them",
                              fix=f"continue it with train.resume={run_dir}, or train "
                                  "into a new folder")
    return run_dir, None


def _setup(recipe, run_dir) -> TrainState:
    """Run folder, device, threads, data, seeded model and optimizer, then either the resumed
    checkpoint or a fresh metrics.jsonl (its first row: the unigram baseline); opens the bar."""
    import composer

    t0 = time.perf_counter()
    cfg, seq_len = recipe.train, recipe.data.seq_len
    run_dir, ckpt = _run_folder(recipe, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    train, val = load_splits(recipe.data)
    check_split(train, seq_len, "training")
    val_batches = fixed_batches(val, cfg.eval_batches, cfg.batch_size, seq_len)
    uni = unigram_bpb(train, val)

    torch.manual_seed(cfg.seed)
    model = composer.build_model(recipe).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2))
    st = TrainState(recipe=recipe, run_dir=run_dir, metrics=run_dir / "metrics.jsonl",
                    device=device, train=train, val_batches=val_batches,
                    unigram_bpb=uni, model=model, opt=opt,
                    params=[p for g in opt.param_groups for p in g["params"]],
                    n_params=sum(p.numel() for p in model.parameters()),
                    gen=torch.Generator().manual_seed(cfg.seed), t0=t0)
    if ckpt is not None:
        _resume(st, ckpt)
    else:
        st.metrics.write_text(json.dumps({"step": 0, "unigram_bpb": st.unigram_bpb,
                                          "train_bytes": train.numel(),
                                          "val_bytes": val.numel(), "params": st.n_params})
                              + "\n")
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
    write_text_atomic(st.metrics, "".join(json.dumps(r) + "\n" for r in read_metrics(st.metrics)
                                          if r.get("step", 0) <= st.step))
    st.saved_step = st.step


def _rng_states(st: TrainState) -> dict[str, torch.Tensor]:
    out = {"batches": st.gen.get_state(), "torch": torch.get_rng_state()}
    if st.device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(st.device)
    return out


def _train_step(st: TrainState) -> None:
    """One optimizer step at ``lr_at(step)``; advance the bar; a train row every ``log_every``."""
    cfg, seq_len = st.cfg, st.recipe.data.seq_len
    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len
    t = time.perf_counter()
    lr = lr_at(st.step, cfg)
    for g in st.opt.param_groups:
        g["lr"] = lr
    loss, grad_norm = _gradients(st.model, st.params, st.train, st.gen, cfg, seq_len, st.device)
    st.updating = True
    st.opt.step()
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
        _append(st.metrics, {"step": st.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                             "tokens": st.tokens, "tokens_per_s": st.tokens_per_s,
                             "elapsed": st.elapsed0 + time.perf_counter() - st.t0})


def _validate(st: TrainState) -> None:
    st.val_loss = evaluate(st.model, st.val_batches, st.device, st.cfg.dtype)
    st.val_step = st.step
    if st.best_val_loss is None or st.val_loss < st.best_val_loss:
        st.best_val_loss = st.val_loss
    _append(st.metrics, {"step": st.step, "val_loss": st.val_loss,
                         "val_bpb": st.val_loss * BITS_PER_NAT})


def _maybe_evaluate(st: TrainState) -> None:
    if st.due(st.cfg.eval_every):
        _validate(st)
        st.bar.set_postfix(loss=f"{st.train_loss:.3f}", tok_s=f"{st.tokens_per_s:,.0f}",
                           val_bpb=f"{st.val_loss * BITS_PER_NAT:.3f}")


def _save(st: TrainState) -> None:
    """Checkpoint this step with the RNG states as of its end."""
    st.elapsed = st.elapsed0 + time.perf_counter() - st.t0
    save_checkpoint(st.run_dir, st.step, st.model, st.opt,
                    {k: getattr(st, k) for k in _TRAINER_FIELDS},
                    st.recipe.model_dump(mode="json"), st.snapshot, keep=st.cfg.keep_checkpoints)
    st.saved_step = st.step


def _maybe_checkpoint(st: TrainState) -> None:
    if st.due(st.cfg.ckpt_every):
        _save(st)


def _on_interrupt(st: TrainState) -> None:
    """Checkpoint the last completed step unless the interrupt landed inside an update."""
    st.bar.close()
    if st.updating:
        print("interrupted inside an optimizer update: no checkpoint written for it",
              file=sys.stderr)
    else:
        if st.saved_step != st.step:
            _save(st)
        print(f"stopped at step {st.step} (checkpointed); continue with "
              f"train.resume={st.run_dir}", file=sys.stderr)


def _finish(st: TrainState) -> dict:
    """Validate and checkpoint the last step if not done yet; write loss.png and summary.json;
    print the verdict against the unigram baseline. Returns the summary."""
    st.bar.close()
    if st.val_step != st.step:
        _validate(st)
    if st.saved_step != st.step:
        _save(st)

    run_dir, uni = st.run_dir, st.unigram_bpb
    val_bpb = st.val_loss * BITS_PER_NAT
    plot_losses(read_metrics(st.metrics), run_dir / "loss.png",
                title=f"{run_dir.name}: {st.n_params / 1e6:.2f}M parameters")
    summary = {"run_dir": str(run_dir), "steps": st.step, "tokens": st.tokens,
               "train_loss": st.train_loss, "val_loss": st.val_loss, "val_bpb": val_bpb,
               "unigram_bpb": uni, "best_val_loss": st.best_val_loss,
               "tokens_per_s": st.session_tokens / st.train_time if st.train_time else None,
               "wall_s": time.perf_counter() - st.t0, "params": st.n_params,
               "device": str(st.device)}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    verdict = "below" if val_bpb < uni else "NOT below"
    print(f"step {st.step}: validation {val_bpb:.3f} bits/byte, {verdict} the unigram "
          f"baseline {uni:.3f}; run folder {run_dir}")
    return summary


def run(recipe, run_dir: Path) -> dict:
    """Train ``recipe`` in ``run_dir`` (or continue ``train.resume``); return the summary
    (also written to ``summary.json``): steps, tokens, train_loss, val_loss (nats), val_bpb,
    unigram_bpb, best_val_loss, tokens_per_s, wall_s, params, device, run_dir."""
    st = _setup(recipe, run_dir)
    try:
        with _sigint_sets(st):
            while st.step < st.cfg.steps:
                if st.interrupted:
                    raise KeyboardInterrupt
                _train_step(st)
                _maybe_evaluate(st)
                _maybe_checkpoint(st)
    except KeyboardInterrupt:
        _on_interrupt(st)
        raise
    return _finish(st)
