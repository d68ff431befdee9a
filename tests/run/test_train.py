"""composer.run.train: a tiny run end to end, interruption, exact resume."""
from __future__ import annotations

import json
import os
import signal

import pytest

import composer
import composer.run.train as train_mod
from composer.run import sources
from composer.core.errors import CheckpointError
from composer.run.data import load_splits
from composer.run.generate import sample_prompt
from composer.run.train import lr_at, read_metrics, run

TINY = ["model.d_model=32", "model.n_layers=2", "data.max_bytes=200000", "data.seq_len=32",
        "train.batch_size=4", "train.steps=6", "train.eval_every=3", "train.ckpt_every=3",
        "train.log_every=1", "train.eval_batches=2", "train.progress=false",
        "train.threads=1", "train.keep_checkpoints=null"]


def tiny(*extra):
    return composer.load_recipe("config", overrides=TINY + list(extra))


def _losses(run_dir):
    rows = read_metrics(run_dir / "metrics.jsonl")
    return ([(r["step"], r["loss"]) for r in rows if "loss" in r],
            [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r])


def _same_curve(a, b):
    (ta, va), (tb, vb) = _losses(a), _losses(b)
    assert [s for s, _ in ta] == [s for s, _ in tb] and [s for s, _ in va] == [s for s, _ in vb]
    for (s, x), (_, y) in zip(ta + va, tb + vb):
        assert x == pytest.approx(y, abs=1e-6), s  # bit-identical here (fp32, CPU)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run (shared by the tests below)."""
    d = tmp_path_factory.mktemp("straight") / "run"
    return d, run(tiny(), d)


def test_tiny_run_writes_everything(straight):
    d, summary = straight
    for name in ("metrics.jsonl", "summary.json", "loss.png"):
        assert (d / name).is_file(), name
    assert (d / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((d / "summary.json").read_text()) == summary
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 32
    assert summary["run_dir"] == str(d)
    for key in ("train_loss", "val_loss", "val_bpb", "unigram_bpb", "tokens_per_s", "wall_s"):
        assert summary[key] > 0, key
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / 0.6931471805599453)
    rows = read_metrics(d / "metrics.jsonl")
    assert rows[0]["step"] == 0 and rows[0]["unigram_bpb"] == summary["unigram_bpb"]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"} <= set(train_rows[0])
    assert [r["step"] for r in rows if "val_bpb" in r] == [3, 6]
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == [
        "latest", "step_000003", "step_000006"]


def test_loss_decreases(tmp_path):
    s = run(tiny("train.steps=30", "train.lr=1e-2", "train.warmup_steps=3",
                 "train.batch_size=8", "train.eval_every=30", "train.ckpt_every=30"),
            tmp_path / "run")
    train, val = _losses(tmp_path / "run")
    first = sum(x for _, x in train[:3]) / 3
    last = sum(x for _, x in train[-3:]) / 3
    assert last < first - 1.0
    assert val[-1][1] < first and s["steps"] == 30


def test_a_completed_run_ends_with_a_sample(tmp_path, capsys):
    d = tmp_path / "run"
    run(tiny("train.steps=2", "train.sample_tokens=12"), d)
    out = capsys.readouterr().out
    verdict, head, text = out.split("\n", 2)
    assert verdict.startswith("step 2: validation") and head.startswith("sample: ")
    _, val = load_splits(tiny().data)
    prompt = sample_prompt(val[:32])
    assert text.startswith(prompt) and (d / "sample.txt").read_text() == text
    assert len(text.encode()) - len(prompt.encode()) in range(12, 12 * 3 + 2)   # U+FFFD: 3


def test_a_failing_sample_is_a_note_and_the_run_completes(tmp_path, capsys, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("no memory left")

    monkeypatch.setattr(train_mod, "training_sample", broken)
    d = tmp_path / "run"
    s = run(tiny("train.steps=2"), d)
    err = capsys.readouterr().err
    assert "note: no sample from the trained model (RuntimeError: no memory left)" in err
    assert s["status"] == "completed" and s["last_checkpoint"] == 2
    assert (d / "checkpoints" / "step_000002").is_dir() and not (d / "sample.txt").exists()


def test_lr_schedule():
    cfg = tiny("train.steps=100", "train.warmup_steps=10", "train.lr=1.0",
               "train.min_lr_ratio=0.1").train
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


@pytest.mark.parametrize("how", ["sigint", "raise"])
def test_interrupt_then_resume_matches_straight_run(tmp_path, monkeypatch, straight, how):
    """Ctrl-C during a step: a checkpoint of step 4 appears (with the batch generator as it was
    after step 4) and a summary saying the run was interrupted there, and resuming reproduces
    the straight run."""
    calls = {"n": 0}
    real = sources.sample_batch

    def interrupting(*args, **kw):
        calls["n"] += 1
        batch = real(*args, **kw)
        if how == "sigint" and calls["n"] == 4:  # graceful: step 4 finishes first
            os.kill(os.getpid(), signal.SIGINT)
        if how == "raise" and calls["n"] == 5:  # at once, after step 5 drew its batch
            raise KeyboardInterrupt
        return batch

    d = tmp_path / "run"
    monkeypatch.setattr(sources, "sample_batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(), d)
    monkeypatch.setattr(sources, "sample_batch", real)
    assert (d / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert not (d / "sample.txt").exists()              # a stopped run prints no sample
    stopped = json.loads((d / "summary.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["last_checkpoint"] == 4
    s = run(tiny(f"train.resume={d}"), tmp_path / "unused")
    assert s["run_dir"] == str(d) and not (tmp_path / "unused").exists()
    _same_curve(d, straight[0])
    assert s["val_loss"] == pytest.approx(straight[1]["val_loss"], abs=1e-6)


def test_resume_from_earlier_checkpoint_truncates_metrics(tmp_path, straight):
    d = tmp_path / "run"
    run(tiny(), d)
    (d / "checkpoints" / "latest").write_text("step_000003\n")
    run(tiny(f"train.resume={d}"), tmp_path / "unused")
    _same_curve(d, straight[0])
    rows = read_metrics(d / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_with_other_model_is_refused(straight):
    d = straight[0]
    with pytest.raises(CheckpointError) as e:
        run(tiny("model.d_model=64", f"train.resume={d}"), d)
    assert "model.d_model" in e.value.why and "train.resume" in e.value.fix
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        run(tiny(), d)
