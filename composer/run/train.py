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
from pathlib import Path

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
def _sigint_sets(flag: dict):
    """While active, the first SIGINT sets ``flag["stop"]`` instead of raising; the handler
    then steps aside so a second one raises ``KeyboardInterrupt`` at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:
        previous = signal.default_int_handler

    def handler(signum, frame):
        flag["stop"] = True
        signal.signal(signal.SIGINT, previous)
        print("\ninterrupt: finishing this step, then writing a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(recipe, run_dir: Path) -> dict:
    """Train ``recipe`` in ``run_dir`` (or continue ``train.resume``); return the summary
    (also written to ``summary.json``): steps, tokens, train_loss, val_loss (nats), val_bpb,
    unigram_bpb, best_val_loss, tokens_per_s, wall_s, params, device, run_dir."""
    import composer

    t0 = time.perf_counter()
    cfg, seq_len = recipe.train, recipe.data.seq_len
    ckpt = None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        ckpt = latest_checkpoint(run_dir)
        check_resumable(recipe, read_recipe(ckpt), ckpt)
    else:
        run_dir = Path(run_dir)
        if any((run_dir / CKPT_DIR).glob("step_*")):
            raise CheckpointError(what="the run folder already holds checkpoints",
                                  where=str(run_dir), why="a new run would mix with them",
                                  fix=f"continue it with train.resume={run_dir}, or train "
                                      "into a new folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
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
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2))
    gen = torch.Generator().manual_seed(cfg.seed)
    st = {"step": 0, "tokens": 0, "elapsed": 0.0, "train_loss": None, "val_loss": None,
          "val_step": None, "best_val_loss": None}
    if ckpt is not None:
        loaded = load_checkpoint(ckpt, model, opt)
        st.update({k: loaded["trainer"][k] for k in st if k in loaded["trainer"]})
        rng = loaded["rng"]
        if not {"batches", "torch"} <= set(rng):
            raise CheckpointError(what="checkpoint lacks the RNG states", where=str(ckpt),
                                  why=f"optim.safetensors holds rng.{sorted(rng)}",
                                  fix="start a new run (train.resume=null)")
        gen.set_state(rng["batches"])
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        write_text_atomic(metrics, "".join(json.dumps(r) + "\n" for r in read_metrics(metrics)
                                           if r.get("step", 0) <= st["step"]))
    else:
        metrics.write_text(json.dumps({"step": 0, "unigram_bpb": uni,
                                       "train_bytes": train.numel(),
                                       "val_bytes": val.numel(), "params": n_params}) + "\n")

    def rng_now() -> dict[str, torch.Tensor]:
        out = {"batches": gen.get_state(), "torch": torch.get_rng_state()}
        if device.type == "cuda":
            out["cuda"] = torch.cuda.get_rng_state(device)
        return out

    elapsed0 = st["elapsed"]
    dump = recipe.model_dump(mode="json")

    def save(snapshot) -> None:
        st["elapsed"] = elapsed0 + time.perf_counter() - t0
        save_checkpoint(run_dir, st["step"], model, opt, dict(st), dump, snapshot,
                        keep=cfg.keep_checkpoints)

    def validate() -> None:
        st["val_loss"] = evaluate(model, val_batches, device, cfg.dtype)
        st["val_step"] = st["step"]
        if st["best_val_loss"] is None or st["val_loss"] < st["best_val_loss"]:
            st["best_val_loss"] = st["val_loss"]
        _append(metrics, {"step": st["step"], "val_loss": st["val_loss"],
                          "val_bpb": st["val_loss"] * BITS_PER_NAT})

    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len
    saved_step = st["step"] if ckpt is not None else None
    snapshot, updating, stop = rng_now(), False, {"stop": False}
    train_time, session_tokens = 0.0, 0
    bar = tqdm(total=cfg.steps, initial=min(st["step"], cfg.steps), disable=not cfg.progress,
               file=sys.stderr, unit="step", dynamic_ncols=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    try:
        with _sigint_sets(stop):
            while st["step"] < cfg.steps:
                if stop["stop"]:
                    raise KeyboardInterrupt
                t = time.perf_counter()
                lr = lr_at(st["step"], cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                loss, grad_norm = _gradients(model, params, train, gen, cfg, seq_len, device)
                updating = True
                opt.step()
                st["step"] += 1
                st["tokens"] += tokens_per_step
                st["train_loss"] = loss
                snapshot = rng_now()
                updating = False
                train_time += time.perf_counter() - t
                session_tokens += tokens_per_step
                tps = session_tokens / train_time
                step = st["step"]
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                if step % cfg.log_every == 0 or step == cfg.steps:
                    _append(metrics, {"step": step, "loss": loss, "lr": lr,
                                      "grad_norm": grad_norm, "tokens": st["tokens"],
                                      "tokens_per_s": tps,
                                      "elapsed": elapsed0 + time.perf_counter() - t0})
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    validate()
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}",
                                    val_bpb=f"{st['val_loss'] * BITS_PER_NAT:.3f}")
                if step % cfg.ckpt_every == 0 or step == cfg.steps:
                    save(snapshot)
                    saved_step = step
    except KeyboardInterrupt:
        bar.close()
        if updating:
            print("interrupted inside an optimizer update: no checkpoint written for it",
                  file=sys.stderr)
        else:
            if saved_step != st["step"]:
                save(snapshot)
            print(f"stopped at step {st['step']} (checkpointed); continue with "
                  f"train.resume={run_dir}", file=sys.stderr)
        raise
    bar.close()
    if st["val_step"] != st["step"]:
        validate()
    if saved_step != st["step"]:
        save(snapshot)

    val_bpb = st["val_loss"] * BITS_PER_NAT
    plot_losses(read_metrics(metrics), run_dir / "loss.png",
                title=f"{run_dir.name}: {n_params / 1e6:.2f}M parameters")
    summary = {"run_dir": str(run_dir), "steps": st["step"], "tokens": st["tokens"],
               "train_loss": st["train_loss"], "val_loss": st["val_loss"], "val_bpb": val_bpb,
               "unigram_bpb": uni, "best_val_loss": st["best_val_loss"],
               "tokens_per_s": session_tokens / train_time if train_time else None,
               "wall_s": time.perf_counter() - t0, "params": n_params, "device": str(device)}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    verdict = "below" if val_bpb < uni else "NOT below"
    print(f"step {st['step']}: validation {val_bpb:.3f} bits/byte, {verdict} the unigram "
          f"baseline {uni:.3f}; run folder {run_dir}")
    return summary
