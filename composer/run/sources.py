"""What the trainer and ``hycomp eval`` read batches from: text or a synthetic task.

A source gives training batches drawn with the trainer's generator (whose state a checkpoint
keeps, so a resumed run draws the same batches) and fixed evaluation batches, all as
``(x, y)`` int64 pairs of shape (B, T); ``y`` holds :data:`IGNORE_INDEX` at positions that are
not scored (tasks score only their answers; text scores every next byte).

* :class:`TextSource` — bytes (:mod:`composer.run.data`): random windows for training, evenly
  spaced windows of the validation split for evaluation; its baseline is the unigram model's
  bits per byte.
* :class:`TaskSource` — a synthetic task (:mod:`composer.run.tasks`): fresh or fixed training
  sequences that never equal a test sequence; evaluation is the whole fixed test set. Its
  baseline is the accuracy of always giving the most frequent answer.

:func:`evaluate` scores a model on such batches: loss (nats per scored token, the mean over all
scored tokens) and, for tasks, accuracy (argmax equals target, over scored tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from composer.run.data import (BITS_PER_NAT, check_split, fixed_batches, load_splits,
                               sample_batch, unigram_bpb)
from composer.run.tasks import IGNORE_INDEX, TaskStream, test_set
from composer.run.tasks import accuracy as count_correct


@dataclass
class Scores:
    """One evaluation: ``loss`` in nats per scored token; ``accuracy`` (tasks) in [0, 1];
    ``tokens`` scored; ``bpb`` (text: bytes are tokens) = loss / ln 2."""
    loss: float
    tokens: int
    accuracy: float | None = None

    @property
    def bpb(self) -> float:
        return self.loss * BITS_PER_NAT


class TextSource:
    """Bytes of ``data`` (a text ``DataConfig``): training windows and validation batches."""

    is_task = False

    def __init__(self, data):
        self.cfg, self.seq_len = data, data.seq_len
        self.train, self.val = load_splits(data)
        check_split(self.train, self.seq_len, "training")

    def batch(self, batch_size: int, generator: torch.Generator):
        return sample_batch(self.train, batch_size, self.seq_len, generator)

    def eval_batches(self, n_batches: int, batch_size: int) -> list:
        return fixed_batches(self.val, n_batches, batch_size, self.seq_len)

    def baseline(self) -> dict:
        """The first metrics row's fields: the unigram baseline and the split sizes."""
        return {"unigram_bpb": unigram_bpb(self.train, self.val),
                "train_bytes": self.train.numel(), "val_bytes": self.val.numel()}


class TaskSource:
    """A synthetic task (``data`` is a ``TaskData``): training stream and the test set."""

    is_task = True

    def __init__(self, data, train: bool = True):
        self.cfg, self.seq_len = data, data.seq_len
        # evaluation alone needs no training stream (a fixed training set costs seconds)
        self.stream = TaskStream(self.cfg) if train else None
        self.test = self.stream.test if train else test_set(self.cfg)

    def batch(self, batch_size: int, generator: torch.Generator):
        return self.stream.batch(batch_size, generator)

    def eval_batches(self, n_batches: int | None, batch_size: int) -> list:
        """The whole test set in batches of ``batch_size`` (``n_batches`` is not used: the
        test set's size is ``data.test_size``)."""
        x, y = self.test
        return list(zip(x.split(batch_size), y.split(batch_size)))

    def baseline(self) -> dict:
        """``chance_acc``: the test accuracy of always giving the test set's most frequent
        answer token (a model that ignores the context), with the set sizes."""
        y = self.test[1]
        answers = y[y != IGNORE_INDEX]
        top = int(answers.bincount().max()) if answers.numel() else 0
        out = {"chance_acc": top / max(1, answers.numel()), "test_size": self.test[0].shape[0],
               "train_size": self.cfg.train_size}
        if self.stream is not None and self.stream.removed:
            out["train_removed"] = self.stream.removed   # fixed-set rows equal to a test row
        return out


def autocast(device: torch.device, dtype: str):
    """bf16 autocast for ``dtype`` bf16 (weights stay fp32); a no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def open_source(data, train: bool = True) -> TextSource | TaskSource:
    """The source of a recipe's ``data`` section; with ``train`` false, only what evaluation
    reads (a task's test set)."""
    return TextSource(data) if data.task == "text" else TaskSource(data, train=train)


def token_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (nats, fp32) of logits (B, T, V) against targets (B, T) over the scored
    positions (``y != IGNORE_INDEX``)."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, dtype: str = "fp32",
             accuracy: bool = False) -> Scores:
    """Loss over every scored token of ``batches`` (a sum, then one division: batches with
    fewer scored tokens weigh less), and the argmax accuracy when ``accuracy``; ``dtype``
    bf16 runs the forward under bf16 autocast. Leaves the model in the mode it was in."""
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    try:
        for x, y in batches:
            y = y.to(device)
            with autocast(device, dtype):
                logits = model(x.to(device))
            total += token_loss(logits, y, "sum").item()
            hits, scored = count_correct(logits, y)
            correct, count = correct + hits, count + scored
    finally:
        model.train(was_training)
    loss = total / count if count else float("nan")
    return Scores(loss=loss, tokens=count,
                  accuracy=(correct / count if count else None) if accuracy else None)
