"""The hycomp command as a user runs it: output, exit codes, no tracebacks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def hycomp(*args, cwd=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "composer.cli.main", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_commands():
    p = hycomp("--help")
    assert p.returncode == 0
    for c in ("train", "check", "viz", "schema", "kernels"):
        assert c in p.stdout


def test_check_json_pattern_example():
    p = hycomp("check", "model.schedule.pattern=M-M-M*-", "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["pattern"] == "M-M-M*-" and rep["n_sublayers"] == 7
    assert [s["kind"] for s in rep["sublayers"]] == ["mamba2", "mlp", "mamba2", "mlp", "mamba2",
                                                     "attention", "mlp"]
    assert rep["sublayers"][0]["fields"]["d_state"] == 32
    assert rep["params"] == (sum(s["params"] for s in rep["sublayers"]) + rep["params_embedding"]
                             + rep["params_final_norm"] + rep["params_head"])
    assert rep["flops_per_token"] > 0


def test_check_table():
    p = hycomp("check", "model.schedule.ratio=5:1", "model.n_layers=12")
    assert p.returncode == 0, p.stderr
    assert "pattern   M-M-M-*-M-M-M-M-*-M-M-M-   (hf counting, 24 sub-layers)" in p.stdout
    assert "parameters" in p.stdout


@pytest.mark.parametrize("args,words", [
    (["check", "model.n_layer=12"], "did you mean 'n_layers'"),
    (["check", "model.blocks.attention.n_heads=5"], "model.blocks.attention.n_heads"),
    (["check", "model=nope"], "packaged model recipes"),
    (["check", "-r", "/no/such.yaml"], "not found"),
    (["check", "model.schedule.pattern=M-Q"], "unknown pattern symbol 'Q'"),
    (["chek"], "did you mean 'check'"),
    (["viz", "--formats", "gif"], "unknown format"),
    (["schema", "--block", "mamba3"], "did you mean 'mamba'"),
    (["train", "model.schedule.ratio=3:x"], "bad ratio"),
    (["train", "-m", "model.schedule.ratio=1:1,3:1,0:0", "train.steps=1"], "sweep job"),
])
def test_bad_input_exits_2_with_what_where_why_fix(args, words, capsys):
    from composer.cli.main import main
    with pytest.raises(SystemExit) as ei:
        main(args)
    err = capsys.readouterr().err
    assert ei.value.code == 2, err
    assert words in err and "fix:" in err, err


def test_bad_input_in_a_real_process_prints_no_traceback():
    p = hycomp("check", "model.n_layer=12")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "did you mean 'n_layers'" in p.stderr


def test_schema_prints_json_schema():
    p = hycomp("schema")
    assert p.returncode == 0
    s = json.loads(p.stdout)
    assert set(s["properties"]) == {"model", "data", "train", "kernels"}
    assert "mamba2" in s["x-blocks"]
    one = json.loads(hycomp("schema", "--block", "attention").stdout)
    assert "window" in one["properties"]


def test_kernels_table():
    p = hycomp("kernels")
    assert p.returncode == 0
    assert "gated_linear_recurrence" in p.stdout and "chunked" in p.stdout
    assert "<- auto" in p.stdout
    scan = next(line for line in p.stdout.splitlines() if " scan " in line)
    assert "V = 1" in scan and "<- auto for these shapes" in scan   # the shape declaration
    # the same shapes at a lower priority: chosen by name only
    slow = next(line for line in p.stdout.splitlines() if " scan_recompute " in line)
    assert "V = 1" in slow and "<- auto" not in slow
    assert " pytorch " in scan                       # pure PyTorch, or compiled code
    native = next(line for line in p.stdout.splitlines() if " native " in line)
    assert " compiled " in native


TINY_TRAIN = ["model.d_model=32", "train.steps=4", "train.eval_every=2", "train.ckpt_every=2",
              "data.max_bytes=200000", "data.seq_len=32", "train.batch_size=4",
              "train.progress=false"]


@pytest.mark.slow
def test_train_sweep_and_resume_through_the_cli(tmp_path):
    p = hycomp("train", "-m", "model.schedule.ratio=1:1,3:1", *TINY_TRAIN,
               f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    # job folders and labels name the swept override, not only the job number
    assert sorted(q.name for q in (tmp_path / "sweep").iterdir() if q.is_dir()) == [
        "0_ratio-1:1", "1_ratio-3:1"]
    for job, ratio in (("0", "1:1"), ("1", "3:1")):
        run = tmp_path / "sweep" / f"{job}_ratio-{ratio}"
        assert (run / "metrics.jsonl").exists() and (run / "loss.png").exists()
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
        assert (run / ".hydra" / "overrides.yaml").exists()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["label"] == f"model.schedule.ratio={ratio}"
        # the overrides as Hydra recorded them (its grammar escapes ':')
        assert f"model.schedule.ratio={ratio}".replace(":", "\\:") in summary["overrides"]
        assert "train.steps=4" in summary["overrides"]
    first = tmp_path / "sweep" / "0_ratio-1:1"
    p = hycomp("train", "model.schedule.ratio=1:1", *TINY_TRAIN, "train.steps=6",
               f"train.resume={first}", f"hydra.run.dir={tmp_path}/resumed", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 6
    p = hycomp("train", "model.schedule.ratio=5:1", *TINY_TRAIN, f"train.resume={first}",
               cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "schedule" in p.stderr


def test_backend_refusing_the_shapes_exits_cleanly(tmp_path):
    """kernels.gated_linear_recurrence=scan with Mamba-2 (V > 1): the registry's shape check
    stops the preflight with what/where/why/fix and exit 2, no traceback, no run folder; in a
    sweep, before its first job."""
    p = hycomp("train", *TINY_TRAIN, "kernels.gated_linear_recurrence=scan",
               f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "kernels.gated_linear_recurrence" in p.stderr and "V = 1" in p.stderr
    assert not (tmp_path / "run").exists()
    p = hycomp("train", "-m", *TINY_TRAIN, "kernels.gated_linear_recurrence=auto,scan",
               f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "sweep job" in p.stderr and "kernels.gated_linear_recurrence=scan" in p.stderr
    assert not (tmp_path / "sweep").exists()
