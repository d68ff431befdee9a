"""Training text as bytes (vocabulary 256): reading, the train/validation split, batches.

Where the bytes come from (``data`` section of a recipe):

* ``path: null`` — the Python standard library's own source (``sysconfig`` ``stdlib`` folder,
  without ``site-packages``), the files matching ``glob``;
* ``path: FILE`` — that file;
* ``path: FOLDER`` — the files under it matching ``glob``.

Files are read in sorted order of their relative path (so the result never depends on the file
system) until ``max_bytes`` bytes are read, and joined with :data:`SEPARATOR`.

Split: a folder's file goes to validation when ``crc32(relative path) / 2**32 < val_fraction``
(the same file always lands on the same side, whatever else is in the folder); if no file lands
there, the file with the smallest hash does, and if every file does, the one with the largest
hash goes back to training. One file: its last ``val_fraction`` of bytes is validation.

Every problem with the data raises :class:`DataError` (what / where / why / fix).
"""
from __future__ import annotations

import math
import os
import sysconfig
import zlib
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from composer.core.errors import DataError

SEPARATOR = b"\n\n"
"""Put between files in a split."""

_FIX_PATH = ("give an existing text file or folder as data.path, or data.path=null for the "
             "Python standard library's source")


def _glob_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether a relative path (its parts) matches a glob (its parts); ``**`` spans 0+ folders."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:],
                                                                             pattern[1:])


def list_files(root: Path, glob: str, skip_dirs: tuple[str, ...] = ()) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of the files under ``root`` matching ``glob``, sorted by
    relative path; folders named in ``skip_dirs`` are not entered."""
    pattern = tuple(p for p in glob.split("/") if p)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        rel_dir = Path(dirpath).relative_to(root).parts
        for name in filenames:
            if _glob_match(rel_dir + (name,), pattern):
                found.append(("/".join(rel_dir + (name,)), Path(dirpath, name)))
    return sorted(found)


def _read(path: Path, limit: int | None, where: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except OSError as e:
        raise DataError(what=f"cannot read data file {path}", where=where,
                        why=e.strerror or str(e),
                        fix="check its permissions, or " + _FIX_PATH) from None


def _sources(cfg) -> tuple[Path, list[tuple[str, Path]], str]:
    """The folder or file to read, its files, and a ``where`` string for messages."""
    if cfg.path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        where = f"data.path=null (standard library at {root}), data.glob={cfg.glob}"
        files = list_files(root, cfg.glob, skip_dirs=("site-packages", "dist-packages"))
        if not files:
            raise DataError(what="no standard-library source files found", where=where,
                            why="this Python installation ships no files matching data.glob",
                            fix="set data.path to a text file or folder of your own")
        return root, files, where
    root = Path(cfg.path).expanduser()
    where = f"data.path={cfg.path}"
    if root.is_file():
        return root, [(root.name, root)], where
    if not root.is_dir():
        raise DataError(what=f"data path not found: {cfg.path}", where=where,
                        why="there is no file or folder there", fix=_FIX_PATH)
    where += f", data.glob={cfg.glob}"
    files = list_files(root, cfg.glob)
    if not files:
        raise DataError(what="no files in the data folder match data.glob", where=where,
                        why=f"nothing under {root} matches {cfg.glob!r}",
                        fix="change data.glob (e.g. data.glob='**/*.txt') or point data.path "
                            "at a file")
    return root, files, where


def _bucket(rel: str) -> float:
    """A stable number in [0, 1) from a relative path."""
    return zlib.crc32(rel.encode("utf-8", "surrogateescape")) / 2**32


def load_splits(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)``: uint8 tensors of shape (n_train,), (n_val,) for a ``DataConfig``."""
    root, files, where = _sources(cfg)
    texts: list[tuple[str, bytes]] = []
    left = cfg.max_bytes
    for rel, path in files:
        if left is not None and left <= 0:
            break
        blob = _read(path, left, where)
        if blob:
            texts.append((rel, blob))
            left = None if left is None else left - len(blob)
    if not texts:
        what = "data file is empty" if len(files) == 1 else "every matching data file is empty"
        raise DataError(what=what, where=where, why="there are no bytes to train on",
                        fix=_FIX_PATH)
    if len(texts) == 1:
        blob = texts[0][1]
        n_val = max(1, int(len(blob) * cfg.val_fraction))
        if len(blob) < 2:
            raise DataError(what="data file too short to split", where=where,
                            why=f"it holds {len(blob)} byte", fix=_FIX_PATH)
        return _tensor(blob[:-n_val]), _tensor(blob[-n_val:])
    is_val = assign_val([rel for rel, _ in texts], cfg.val_fraction)
    train = SEPARATOR.join(blob for (_, blob), v in zip(texts, is_val) if not v)
    val = SEPARATOR.join(blob for (_, blob), v in zip(texts, is_val) if v)
    return _tensor(train), _tensor(val)


def assign_val(rels: list[str], val_fraction: float) -> list[bool]:
    """Per file (2 or more), whether it is a validation file: ``crc32(rel) / 2**32 <
    val_fraction``, with at least one file on each side (module docstring)."""
    buckets = [_bucket(rel) for rel in rels]
    is_val = [b < val_fraction for b in buckets]
    if not any(is_val):
        is_val[buckets.index(min(buckets))] = True
    if all(is_val):
        is_val[buckets.index(max(buckets))] = False
    return is_val


def _tensor(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def check_split(data: torch.Tensor, seq_len: int, split: str) -> None:
    """Raise :class:`DataError` unless ``data`` holds one window of ``seq_len + 1`` bytes."""
    if data.numel() < seq_len + 1:
        raise DataError(what=f"the {split} split is too short for data.seq_len",
                        where=f"data.seq_len={seq_len}",
                        why=f"it holds {data.numel()} bytes; a sequence needs seq_len + 1 = "
                            f"{seq_len + 1} (inputs and next-byte targets)",
                        fix="lower data.seq_len, change data.val_fraction, or give more text "
                            "(data.path / data.max_bytes)")


def _windows(data: torch.Tensor, offsets: torch.Tensor, seq_len: int):
    chunk = data[offsets[:, None] + torch.arange(seq_len + 1)].long()
    return chunk[:, :-1], chunk[:, 1:]


def sample_batch(data: torch.Tensor, batch_size: int, seq_len: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows: ``x, y`` int64 of shape (batch_size, seq_len), with
    ``y[:, t] = x[:, t + 1]`` (the next byte); offsets uniform in ``[0, n - seq_len - 1]``."""
    check_split(data, seq_len, "training")
    offsets = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    return _windows(data, offsets, seq_len)


def fixed_batches(data: torch.Tensor, n_batches: int, batch_size: int,
                  seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` validation batches (as :func:`sample_batch`) at evenly spaced offsets over
    the whole split: the same batches every time, no random state involved."""
    check_split(data, seq_len, "validation")
    offsets = torch.linspace(0, data.numel() - seq_len - 1, n_batches * batch_size)
    offsets = offsets.round().long().view(n_batches, batch_size)
    return [_windows(data, o, seq_len) for o in offsets]


def unigram_bpb(train: torch.Tensor, val: torch.Tensor) -> float:
    """Cross-entropy in bits per byte of the unigram model fitted on ``train`` and scored on
    ``val``: ``p(b) = (count_train(b) + 1) / (n_train + 256)`` (add-one smoothing), result
    ``-(1 / n_val) * sum_t log2 p(val_t)``. A model must beat this to have learnt context."""
    counts = torch.bincount(train.long(), minlength=256).double() + 1.0
    log2p = torch.log2(counts / counts.sum())
    val_counts = torch.bincount(val.long(), minlength=256).double()
    return float(-(val_counts * log2p).sum() / val.numel())


BITS_PER_NAT = 1 / math.log(2)
"""Multiply a cross-entropy in nats by this for bits (per byte, for byte tokens)."""
