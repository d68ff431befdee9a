"""composer.run.data: reading, the split, batches and the unigram baseline."""
from __future__ import annotations

import math
import os
from collections import Counter

import pytest
import torch

from composer.run.data import (SEPARATOR, assign_val, fixed_batches, list_files, load_splits,
                           sample_batch, unigram_bpb)
from composer.core.errors import DataError
from composer.recipe.schema import DataConfig


def test_stdlib_default_is_found_and_deterministic():
    cfg = DataConfig(max_bytes=200_000)
    train, val = load_splits(cfg)
    assert train.dtype == torch.uint8 and val.dtype == torch.uint8
    assert train.numel() > 100_000 and val.numel() > 0
    assert train.numel() + val.numel() <= 200_000 + 200 * len(SEPARATOR)
    again = load_splits(cfg)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert b"def " in bytes(train[:50_000].tolist())


def test_stdlib_listing_skips_site_packages():
    import sysconfig
    from pathlib import Path
    root = Path(sysconfig.get_paths()["stdlib"])
    files = list_files(root, "**/*.py", skip_dirs=("site-packages",))
    rels = [rel for rel, _ in files]
    assert "os.py" in rels and rels == sorted(rels)
    assert not any("site-packages" in r.split("/") for r in rels)


def _folder(tmp_path, n=40):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(n):
        where = d / "sub" if i % 2 else d
        (where / f"f{i:02d}.txt").write_bytes(f"<{i:02d}>".encode() * 50)
    (d / "skip.md").write_text("not matched")
    return d


def test_folder_split_is_by_file_and_disjoint(tmp_path):
    d = _folder(tmp_path)
    cfg = DataConfig(path=str(d), glob="**/*.txt", val_fraction=0.2)
    train, val = load_splits(cfg)
    tb, vb = bytes(train.tolist()), bytes(val.tolist())
    rels = [rel for rel, _ in list_files(d, "**/*.txt")]
    assert len(rels) == 40 and "sub/f01.txt" in rels
    is_val = assign_val(rels, 0.2)
    assert 0 < sum(is_val) < len(rels)
    for rel, v in zip(rels, is_val):
        tag = f"<{rel[-6:-4]}>".encode()
        assert (tag in vb) == v and (tag in tb) == (not v), rel
    assert b"not matched" not in tb + vb
    assert torch.equal(load_splits(cfg)[1], val)


def test_split_always_has_a_val_and_a_train_file():
    assert sum(assign_val(["a", "b"], 1e-9)) == 1
    assert sum(assign_val(["a", "b"], 1 - 1e-9)) == 1


def test_single_file_holds_out_its_tail(tmp_path):
    f = tmp_path / "book.txt"
    text = bytes(range(256)) * 40
    f.write_bytes(text)
    train, val = load_splits(DataConfig(path=str(f), val_fraction=0.1))
    assert val.numel() == int(len(text) * 0.1)
    assert bytes(train.tolist()) + bytes(val.tolist()) == text


def test_max_bytes_caps_reading(tmp_path):
    f = tmp_path / "big.txt"
    f.write_bytes(b"x" * 5000)
    train, val = load_splits(DataConfig(path=str(f), max_bytes=2000))
    assert train.numel() + val.numel() == 2000


@pytest.mark.parametrize("case", ["missing", "empty_file", "no_match", "all_empty",
                                  "unreadable"])
def test_bad_paths_raise_data_error(tmp_path, case):
    glob = "**/*.txt"
    if case == "missing":
        path = tmp_path / "nope"
    elif case == "empty_file":
        path = tmp_path / "empty.txt"
        path.write_bytes(b"")
    else:
        path = tmp_path / "dir"
        path.mkdir()
        if case == "no_match":
            (path / "a.md").write_text("hello")
        elif case == "all_empty":
            (path / "a.txt").write_bytes(b"")
            (path / "b.txt").write_bytes(b"")
        else:  # a broken link matches the glob but cannot be opened
            (path / "a.txt").write_text("hello")
            os.symlink(tmp_path / "gone", path / "b.txt")
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(path=str(path), glob=glob))
    err = e.value
    assert err.what and err.where and err.why and err.fix
    assert "data.path" in err.where or str(path) in err.where


def test_batches_shapes_and_shift():
    data = (torch.arange(5000) % 256).to(torch.uint8)
    g = torch.Generator().manual_seed(3)
    x, y = sample_batch(data, 4, 16, g)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, (x + 1) % 256)
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = sample_batch(data, 4, 16, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2)


def test_validation_batches_are_fixed():
    data = (torch.arange(3000) % 251).to(torch.uint8)
    a = fixed_batches(data, 3, 4, 32)
    torch.manual_seed(123)
    b = fixed_batches(data, 3, 4, 32)
    assert len(a) == 3 and all(x.shape == (4, 32) for x, _ in a)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert a[0][0][0, 0] == 0 and a[-1][1][-1, -1] == data[-1]


def test_too_short_split_is_a_data_error():
    with pytest.raises(DataError, match="too short") as e:
        sample_batch(torch.zeros(10, dtype=torch.uint8), 2, 10, torch.Generator())
    assert "data.seq_len" in e.value.where and e.value.fix
    with pytest.raises(DataError, match="validation"):
        fixed_batches(torch.zeros(5, dtype=torch.uint8), 1, 1, 8)


def test_unigram_bpb_matches_counter():
    train = b"abracadabra, a banana bandana"
    val = b"cabana! abba"
    counts = Counter(train)
    total = len(train) + 256
    expect = -sum(math.log2((counts[b] + 1) / total) for b in val) / len(val)
    got = unigram_bpb(torch.tensor(list(train), dtype=torch.uint8),
                      torch.tensor(list(val), dtype=torch.uint8))
    assert got == pytest.approx(expect, rel=1e-12)
