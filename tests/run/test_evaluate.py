"""Training on a synthetic task, ``hycomp eval``, and the scored-position loss they share."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import composer
from composer.core.errors import HycompError, RecipeError
from composer.recipe.tasks import TASKS
from composer.run.evaluate import evaluate_run, parse_settings
from composer.run.generate import load_model
from composer.run.records import read_metrics
from composer.run.sources import token_loss
from composer.run import tasks
from composer.run.tasks import IGNORE_INDEX
from composer.run.train import run

SMALL = ["model.d_model=32", "model.n_layers=2", "train.batch_size=8", "train.steps=6",
         "train.eval_every=3", "train.ckpt_every=3", "train.log_every=1",
         "train.progress=false", "train.threads=1", "train.sample_tokens=0"]
TASK = ["data=mqar", "data.seq_len=32", "data.num_pairs=4", "data.test_size=40"]
TEXT = ["data.max_bytes=200000", "data.seq_len=32", "train.eval_batches=2"]


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("task") / "run"
    recipe = composer.load_recipe("config", overrides=SMALL + TASK)
    return d, recipe, run(recipe, d, overrides=["data=mqar"], label="mqar tiny")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("text") / "run"
    return d, run(composer.load_recipe("config", overrides=SMALL + TEXT), d)


def _accuracy_by_hand(model, x, y):
    """Argmax accuracy and mean loss over scored positions, one sequence at a time."""
    correct = scored = 0
    nll = 0.0
    with torch.no_grad():
        for i in range(x.shape[0]):
            logits = model(x[i:i + 1])[0]
            for t in range(x.shape[1]):
                if y[i, t] != IGNORE_INDEX:
                    scored += 1
                    correct += int(logits[t].argmax() == y[i, t])
                    nll -= torch.log_softmax(logits[t].double(), -1)[y[i, t]].item()
    return correct / scored, nll / scored, scored


def test_token_loss_scores_only_marked_positions():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 11, generator=g)
    y = torch.randint(0, 11, (3, 7), generator=g)
    y[torch.rand(3, 7, generator=g) < 0.5] = IGNORE_INDEX
    y[0, 0] = 4  # at least one scored position
    keep = y != IGNORE_INDEX
    by_hand = -torch.log_softmax(logits.double(), -1)[keep].gather(
        -1, y[keep][:, None]).mean()
    assert token_loss(logits, y).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_task_run_records_accuracy(task_run):
    d, recipe, summary = task_run
    assert summary["task"] == "mqar" and summary["label"] == "mqar tiny"
    assert summary["overrides"] == ["data=mqar"]
    assert summary["schedule"] == recipe.schedule.pattern
    assert 0 <= summary["val_acc"] <= 1 and summary["best_val_acc"] >= summary["val_acc"]
    assert "val_bpb" not in summary and "unigram_bpb" not in summary
    rows = read_metrics(d / "metrics.jsonl")
    # chance: always answering the test set's most frequent answer
    x, y = tasks.test_set(recipe.data)
    answers = y[y != IGNORE_INDEX].tolist()
    most = max(answers.count(a) for a in set(answers))
    assert rows[0]["chance_acc"] == pytest.approx(most / len(answers))
    val = [r for r in rows if "val_acc" in r]
    assert [r["step"] for r in val] == [3, 6]
    assert max(r["val_acc"] for r in val) == summary["best_val_acc"]
    # the final accuracy and loss, recomputed one sequence at a time from the checkpoint
    model, _ = load_model(d)
    acc, loss, scored = _accuracy_by_hand(model, x, y)
    assert scored == recipe.data.test_size * recipe.data.num_pairs
    assert summary["val_acc"] == pytest.approx(acc, abs=1e-9)
    assert summary["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert (d / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_of_own_task_matches_training_then_extrapolates(task_run):
    d, recipe, summary = task_run
    out = evaluate_run(d, seq_lens=[32, 64], device="cpu")
    own, longer = out["results"]
    assert (own["task"], own["seq_len"], longer["seq_len"]) == ("mqar", 32, 64)
    assert own["accuracy"] == pytest.approx(summary["val_acc"], abs=1e-9)
    assert own["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert own["n"] == longer["n"] == recipe.data.test_size * recipe.data.num_pairs
    model, _ = load_model(d)
    long_cfg = recipe.data.with_seq_len(64)
    acc, loss, _ = _accuracy_by_hand(model, *tasks.test_set(long_cfg))
    assert longer["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert longer["loss"] == pytest.approx(loss, rel=1e-5)
    saved = json.loads((d / "eval.json").read_text())
    assert saved["step"] == summary["steps"] and len(saved["results"]) == 2


def test_eval_json_keeps_other_items_and_replaces_repeats(task_run):
    d, _, _ = task_run
    evaluate_run(d, seq_lens=[32], device="cpu")
    evaluate_run(d, tasks=["mqar"], settings={"num_pairs": 2}, device="cpu")
    evaluate_run(d, tasks=["mqar"], settings={"num_pairs": 2}, device="cpu")
    results = json.loads((d / "eval.json").read_text())["results"]
    pairs = sorted((r["seq_len"], r["settings"]["num_pairs"]) for r in results)
    assert pairs == [(32, 2), (32, 4), (64, 4)]


def test_eval_of_text_run_matches_its_validation(text_run):
    d, summary = text_run
    (row,) = evaluate_run(d, device="cpu")["results"]
    assert row["task"] == "text" and row["accuracy"] is None
    assert row["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert row["bpb"] == pytest.approx(row["loss"] / math.log(2))
    assert row["n"] == 2 * 8 * 32  # eval_batches x batch_size x seq_len


@pytest.mark.parametrize("kwargs, words", [
    ({"tasks": ["mqr"]}, ["unknown task 'mqr'", "mqar"]),
    ({"tasks": ["mqar"], "settings": {"num_pairs": 100}}, ["num_pairs"]),
    ({"tasks": ["mqar"], "settings": {"vocab_size": 512}}, ["vocabulary of 512", "256"]),
    ({"seq_lens": [4096]}, ["max_seq_len"]),
    ({"seq_lens": [2]}, ["bad length 2", "data.seq_len", "greater than or equal to 4"]),
    ({"tasks": ["mqar"], "settings": {"pairs": 3}}, ["unknown key 'pairs'"]),
])
def test_eval_bad_input_says_what_and_where(task_run, kwargs, words):
    d, _, _ = task_run
    with pytest.raises(HycompError) as e:
        evaluate_run(d, device="cpu", write=False, **kwargs)
    text = e.value.render()
    for w in words:
        assert w in text, text


def test_parse_settings_reads_yaml_scalars():
    assert parse_settings(["num_pairs=16", "data.power=0.5", "train_size=null"]) == {
        "num_pairs": 16, "power": 0.5, "train_size": None}
    with pytest.raises(HycompError):
        parse_settings(["num_pairs"])


def test_cli_eval_prints_table_and_fails_cleanly(task_run, tmp_path):
    d, _, _ = task_run
    cmd = [sys.executable, "-m", "composer.cli", "eval"]
    ok = subprocess.run(cmd + [str(d), "--task", "mqar", "num_pairs=2", "--seq-len", "32",
                              "--no-write", "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    (row,) = json.loads(ok.stdout)["results"]   # the setting after an option was taken
    assert row["task"] == "mqar" and row["settings"]["num_pairs"] == 2
    for bad in ([str(tmp_path / "nothing")], [str(d), "--task", "nope"],
                [str(d), "--seq-len", "x"], [str(d), "--batches", "0"],
                [str(d), "--task", "mqar", "--nope"]):
        r = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (bad, r.stderr)
        assert "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- recipe validation of task data --------------------------------------------------------
def test_task_recipes_validate_and_reject_impossible_settings():
    r = composer.load_recipe("config", overrides=["data=mqar"])
    assert r.data.task == "mqar"
    with pytest.raises(RecipeError) as e:
        composer.load_recipe("config", overrides=["data=mqar", "data.num_pairs=1000"])
    assert "data.num_pairs" in e.value.render()
    with pytest.raises(RecipeError) as e:
        composer.load_recipe("config", overrides=["data=mqar", "data.vocab_size=1024"])
    assert "model.vocab_size" in e.value.render()
    with pytest.raises(RecipeError) as e:
        composer.validate_recipe({"data": {"task": "mqarr"}})
    text = e.value.render()
    assert "data" in text and "mqar" in text and "Traceback" not in text


def test_old_recipes_without_task_are_text():
    r = composer.validate_recipe({"model": {"schedule": {"layers": ["attention"]}},
                                  "data": {"path": None, "seq_len": 64}})
    assert r.data.task == "text" and r.data.seq_len == 64


def test_job_dir_names_are_safe_and_bounded():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from composer.run.app import MAX_JOB_DIR, job_dir
    # Hydra escapes its grammar's characters in override_dirname; names show the plain value
    assert job_dir(3, r"model.schedule.ratio=3\:1,train.lr=0.001") == "3_ratio-3:1_lr-0.001"
    assert job_dir(1, "data=mqar,model.schedule.pattern=MMM*") == "1_data-mqar_pattern-MMM*"
    assert job_dir(2, "model.blocks.a.window=3,model.blocks.b.window=4") == \
        "2_model.blocks.a.window-3_model.blocks.b.window-4"   # same last part: whole keys
    assert job_dir(0, "") == "0" and job_dir(1, None) == "1"
    assert job_dir(2, "data.path=/tmp/x y") == "2_path-_tmp_x_y"
    long_a, long_b = job_dir(5, "k=" + "a" * 200), job_dir(5, "k=" + "a" * 199 + "b")
    assert len(long_a) == MAX_JOB_DIR and long_a != long_b  # cut, then told apart by a hash
    # every name can be given back in an override (train.resume=<sweep>/<job folder>)
    parser = OverridesParser.create()
    for name in (long_a, job_dir(4, r"model.schedule.ratio=3\:1,x.pattern=M*M-,y=a\,b")):
        assert parser.parse_override(f"train.resume=runs/{name}").value() == f"runs/{name}"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_trains_and_evaluates(task, tmp_path):
    """Each packaged task through the whole path: data=<task> trains (2 steps, its packaged
    settings at a short length), logs a test accuracy, and hycomp eval repeats it."""
    short = {"seq_len": 48, "test_size": 16}
    if TASKS[task]().train_size is not None:
        short["train_size"] = 64
    overrides = [f"data={task}", *(f"data.{k}={v}" for k, v in short.items()),
                 "model.d_model=16", "model.n_layers=1", "train.batch_size=4",
                 "train.steps=2", "train.eval_every=2", "train.progress=false"]
    d = tmp_path / "run"
    summary = run(composer.load_recipe("config", overrides=overrides), d)
    assert summary["task"] == task and 0 <= summary["val_acc"] <= 1
    (row,) = evaluate_run(d, device="cpu", write=False)["results"]
    assert row["accuracy"] == pytest.approx(summary["val_acc"], abs=1e-9)
    assert row["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
