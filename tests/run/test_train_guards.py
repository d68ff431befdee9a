"""Issue 13's training findings: unique run folders, non-finite steps, resume without retyping
the recipe, clear refusals before allocating, warnings, the status summary of a stopped run,
file modes. Each test failed before its fix."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

import composer
from composer.run import sources
from composer.core.errors import DataError, HycompError, RecipeError
from composer.run.checkpoint import load_checkpoint
from composer.run.train import read_metrics, run

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.d_model=32", "model.n_layers=2", "data.max_bytes=200000", "data.seq_len=32",
        "train.batch_size=4", "train.steps=6", "train.eval_every=3", "train.ckpt_every=3",
        "train.log_every=1", "train.eval_batches=2", "train.progress=false",
        "train.threads=1", "train.keep_checkpoints=null", "train.warmup_steps=2"]


def tiny(*extra):
    return composer.load_recipe("config", overrides=TINY + list(extra))


def hycomp(*args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "composer.cli.main", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _strict(line: str):
    def bad(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(line, parse_constant=bad)


# ---- 2: run folders are unique -----------------------------------------------------------------
def test_two_claims_of_the_default_run_folder_get_different_folders(tmp_path, monkeypatch):
    """Two runs composed in the same second (``now`` pinned) resolve hydra.run.dir (and the
    sweep dir) to two folders, both created."""
    import composer.run.app  # noqa: F401 - registers the run-folder resolver
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import hydra.core.utils

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2030, 1, 2, 3, 4, 5)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)  # Hydra's ${now:...}
    try:
        dirs = []
        for _ in range(2):
            GlobalHydra.instance().clear()
            with initialize_config_module(config_module="recipes", version_base=None):
                cfg = compose(config_name="config", return_hydra_config=True)
                dirs.append((str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)))
    finally:
        GlobalHydra.instance().clear()
    assert dirs[0][0].startswith("runs/2030-01-02/03-04-05")
    (run_a, sweep_a), (run_b, sweep_b) = dirs
    assert run_a != run_b and sweep_a != sweep_b
    for d in (run_a, run_b, sweep_a, sweep_b):
        assert (tmp_path / d).is_dir(), d


@pytest.mark.slow
def test_two_processes_started_together_train_in_different_folders(tmp_path):
    args = ["train", *TINY, "train.steps=1", "hydra.run.dir=${unique_dir:runs/same}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "composer.cli.main", *args], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["same", "same-1"]
    for f in folders:
        s = json.loads((tmp_path / "runs" / f / "summary.json").read_text())
        assert s["steps"] == 1 and s["run_dir"].endswith(f)


def test_a_folder_a_live_run_trains_in_is_refused(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / ".lock").write_text(f"{os.getppid()}\n")  # a live process (pytest's parent)
    with pytest.raises(HycompError, match="another run is training in this folder"):
        run(tiny(), d)
    (d / ".lock").write_text("999999999\n")  # a dead one: taken over
    assert run(tiny("train.steps=1"), d)["steps"] == 1
    assert not (d / ".lock").exists()


# ---- 3: non-finite steps -----------------------------------------------------------------------
def test_diverging_run_stops_with_exit_code_3_and_keeps_good_checkpoints(tmp_path, capsys):
    d = tmp_path / "run"
    run(tiny(), d)                                       # good checkpoints at steps 3 and 6
    with pytest.raises(HycompError) as e:
        run(tiny(f"train.resume={d}", "train.steps=30", "train.lr=1e6", "train.ckpt_every=3",
                 "train.keep_checkpoints=1", "train.max_bad_steps=4"), d)
    assert e.value.exit_code == 3 and "diverged" in e.value.what
    assert "skipped" in capsys.readouterr().err
    ckpts = sorted(p.name for p in (d / "checkpoints").iterdir())
    assert "step_000006" in ckpts and (d / "checkpoints" / "latest").read_text().strip() in ckpts
    for name in ckpts:
        if name.startswith("step_"):
            model = composer.build_model(tiny())
            load_checkpoint(d / "checkpoints" / name, model)
            assert all(p.isfinite().all() for p in model.parameters()), name
    rows = [_strict(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    bad = [r for r in rows if "loss" in r and r["loss"] is None]
    assert bad and bad[-1]["skipped_steps"] >= 4


def test_nonfinite_values_are_written_as_null():
    from composer.run.records import metrics_line
    row = {"step": 1, "loss": float("nan"), "grad_norm": float("inf")}
    assert _strict(metrics_line(row)) == {"step": 1, "loss": None, "grad_norm": None}


def test_loss_png_draws_finite_points_of_a_null_metrics_file(tmp_path):
    from composer.run.plots import plot_losses
    rows = [{"step": 0, "unigram_bpb": 4.5}, {"step": 1, "loss": 5.0}, {"step": 2, "loss": None},
            {"step": 3, "loss": float("nan")}, {"step": 3, "val_loss": None}]
    out = plot_losses(rows, tmp_path / "loss.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


# ---- 4: resume without retyping the recipe ------------------------------------------------------
@pytest.mark.slow
def test_resume_takes_the_recipe_from_the_checkpoint(tmp_path):
    first = tmp_path / "run"
    p = hycomp("train", *TINY, "train.steps=2", f"hydra.run.dir={first}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "step 2/6" in (first / "train.log").read_text() or "step 2/2" in \
        (first / "train.log").read_text()
    p = hycomp("train", f"train.resume={first}", "train.steps=4", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = read_metrics(first / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]          # log_every=1 kept
    assert train_rows[-1]["tokens"] == 4 * 4 * 32                     # batch_size=4 kept
    p = hycomp("train", f"train.resume={first}", "model.d_model=64", "model.n_layers=2",
               cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "model.d_model=64" in p.stderr and "model.n_layers" not in p.stderr.split("why")[1]


# ---- 6: clear errors instead of tracebacks ------------------------------------------------------
def test_model_too_large_for_memory_is_refused_before_allocating():
    with pytest.raises(HycompError) as e:
        run(tiny("model.d_model=100000"), Path("/nonexistent/never-created"))
    assert "GiB" in e.value.what and "available" in e.value.why
    assert "train.ignore_memory_check=true" in e.value.fix


def test_bytes_outside_the_vocabulary_are_refused(tmp_path):
    with pytest.raises(DataError, match="vocabulary") as e:
        run(tiny("model.vocab_size=100"), tmp_path / "run")
    assert "model.vocab_size=256" in e.value.fix


def test_seq_len_beyond_max_seq_len_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="max_seq_len"):
        run(tiny("model.max_seq_len=16"), tmp_path / "run")


@pytest.mark.parametrize("where", ["resume_file", "proc", "under_file"])
def test_impossible_folders_exit_2_without_traceback(tmp_path, where):
    f = tmp_path / "afile"
    f.write_text("x")
    arg = {"resume_file": f"train.resume={f}", "proc": "hydra.run.dir=/proc/hycomp-x",
           "under_file": f"hydra.run.dir={f}/x"}[where]
    p = hycomp("train", *TINY, arg, cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "fix:" in p.stderr


# ---- 11 and 16: warnings ------------------------------------------------------------------------
def test_binary_data_and_long_warmup_are_warned_about(tmp_path, capsys):
    blob = bytes(range(256)) * 800 + b"\0" * 50000
    (tmp_path / "data.bin").write_bytes(blob)
    run(tiny(f"data.path={tmp_path / 'data.bin'}", "train.steps=1", "train.warmup_steps=5"),
        tmp_path / "run")
    err = capsys.readouterr().err
    assert "does not look like text" in err and "warmup_steps=5 >= train.steps=1" in err


# ---- 16: a stopped run still writes its summary -------------------------------------------------
def test_failed_run_records_status_and_loss_png(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = sources.sample_batch

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk on fire")
        return real(*a, **kw)

    monkeypatch.setattr(sources, "sample_batch", failing)
    d = tmp_path / "run"
    with pytest.raises(RuntimeError):
        run(tiny(), d)
    s = json.loads((d / "summary.json").read_text())
    assert s["status"] == "failed" and "disk on fire" in s["error"] and s["steps"] == 3
    assert (d / "loss.png").is_file() and s["last_checkpoint"] == 3


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_an_interrupted_summary(tmp_path):
    d = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "composer.cli.main", "train", *TINY,
                             "train.steps=100000", "train.ckpt_every=100000",
                             f"hydra.run.dir={d}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(
            "loss" in r for r in read_metrics(d / "metrics.jsonl")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    s = json.loads((d / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["steps"] >= 1
    assert (d / "loss.png").is_file()
    assert (d / "checkpoints" / "latest").read_text().strip() == f"step_{s['steps']:06d}"


# ---- 17: file modes follow the umask ------------------------------------------------------------
def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        d = tmp_path / "run"
        run(tiny("train.steps=3"), d)
    finally:
        os.umask(old)
    ckpt = d / "checkpoints" / "step_000003"
    assert ckpt.stat().st_mode & 0o777 == 0o755
    for f in [*ckpt.iterdir(), d / "checkpoints" / "latest", d / "summary.json"]:
        assert f.stat().st_mode & 0o777 == 0o644, f
    shutil.rmtree(d)
