"""train.logger's sinks: what TensorBoard's and W&B's own readers find in the run folder equals
the rows logged (names, steps, values); missing packages are refused with their pip command; a
failing sink is one warning and the run goes on."""
from __future__ import annotations

import json
import math
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from composer.core.errors import HycompError
from composer.run.loggers import MetricSinks, check_sinks, scalar_tags

CONFIG = {"model": {"d_model": 32, "blocks": ["attn", "mamba2"], "norm": None},
          "train": {"lr": 3e-4, "steps": 12, "bf16": True}}


def _rows(first: int, last: int, val_every: int = 4) -> list[dict]:
    """metrics.jsonl-like rows with random values: a train row per step, a validation row every
    ``val_every``; one NaN loss and one None accuracy that no sink may show."""
    rows = []
    for step in range(first, last + 1):
        loss, lr, gn, tps = torch.rand(4, dtype=torch.float64).tolist()
        rows.append({"step": step, "loss": loss, "lr": lr, "grad_norm": gn,
                     "tokens_per_s": 1e4 * tps, "tokens": 512 * step, "skipped_steps": 0})
        if step % val_every == 0:
            v = torch.rand(1, dtype=torch.float64).item()
            rows.append({"step": step, "val_loss": v, "val_bpb": v / math.log(2),
                         "val_acc": None})
    rows[2]["loss"] = float("nan")
    return rows


def _expected(rows: list[dict]) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, built by hand from the documented mapping."""
    names = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
             "tokens_per_s": "train/tokens_per_s", "val_loss": "val/loss", "val_bpb": "val/bpb"}
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and value is not None and math.isfinite(value):
                out.setdefault(names.get(key, f"misc/{key}"), {})[row["step"]] = value
    return out


def _log(names, run_dir, rows, **kw) -> None:
    sinks = MetricSinks(names, run_dir, CONFIG, run_dir.name, **kw)
    for row in rows:
        sinks.log(row)
    sinks.close()


def test_scalar_tags_groups_and_skips():
    a, b, c = torch.rand(3, dtype=torch.float64).tolist()
    row = {"step": 7, "loss": a, "val_bpb": b, "unigram_bpb": c, "params": 1234,
           "val_acc": None, "grad_norm": float("nan"), "lr": float("inf"), "device": "cpu",
           "ok": True}
    assert scalar_tags(row) == {"train/loss": a, "val/bpb": b, "misc/unigram_bpb": c,
                                "misc/params": 1234.0}


# --- TensorBoard, read back with its own EventAccumulator ------------------------------------

def _tensorboard(run_dir: Path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them, repeats and stale ones included."""
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for tag in want:
        assert [s for s, _ in got[tag]] == list(want[tag]), tag
        for (step, value), expected in zip(got[tag], want[tag].values()):
            assert value == pytest.approx(expected, rel=1e-6), (tag, step)  # float32


def test_tensorboard_shows_the_rows_in_the_run_folder(tmp_path):
    pytest.importorskip("tensorboard")
    rows = _rows(1, 12)
    _log(["tensorboard"], tmp_path, rows)
    assert list(tmp_path.glob("events.out.tfevents.*"))  # the run folder itself is the logdir
    _assert_same(_scalars(_tensorboard(tmp_path)), _expected(rows))


def test_tensorboard_resumed_session_keeps_both_sessions(tmp_path):
    pytest.importorskip("tensorboard")
    # validation at 4, 8 then at 10: the first session's step 8 must not outlive the resume
    first, second = _rows(1, 10), _rows(7, 14, val_every=5)
    _log(["tensorboard"], tmp_path, first)
    time.sleep(1.1)  # event files are named and read in order of their start second
    _log(["tensorboard"], tmp_path, second, start_step=6)  # resumed from the step-6 checkpoint
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    # as metrics.jsonl after a resume: the first session's rows up to step 6, then the second's
    want = _expected([r for r in first if r["step"] <= 6] + second)
    _assert_same(_scalars(_tensorboard(tmp_path)), want)


def test_tensorboard_has_the_config_as_text_and_hparams(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    _log(["tensorboard"], tmp_path, _rows(1, 4))
    acc = _tensorboard(tmp_path)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n")) == CONFIG
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["model.d_model"].number_value == 32
    assert hp["train.lr"].number_value == pytest.approx(3e-4)
    assert json.loads(hp["model.blocks"].string_value) == ["attn", "mamba2"]
    assert "model.norm" not in hp


def test_failing_sink_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    def boom(*args, **kwargs):
        raise OSError("disk full")

    sinks = MetricSinks(["tensorboard"], tmp_path, CONFIG, "r")
    monkeypatch.setattr(SummaryWriter, "add_scalar", boom)
    for row in _rows(1, 5):
        sinks.log(row)
    sinks.close()
    sinks.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "train.logger" in line]
    assert len(warnings) == 1 and "disk full" in warnings[0], warnings


# --- missing packages -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_check_sinks_names_the_pip_command_for_a_missing_package(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(HycompError) as e:
        check_sinks([name])
    assert e.value.where == f"train.logger={name}"
    assert f"pip install {name}" in e.value.fix and f'pip install -e ".[{name}]"' in e.value.fix
    with pytest.raises(HycompError):
        MetricSinks([name], Path("unused"), CONFIG, "r")


# --- W&B, read back from the offline run's .wandb file ----------------------------------------

def _wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: a 7-byte W&B header, then LevelDB's log
    format (32 KiB blocks of chunks: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4;
    a block tail under 7 bytes is padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            yield pb.Record.FromString(chunks)
            chunks = b""


def _wandb_run(run_dir: Path) -> tuple[dict, str, dict[str, dict[int, float]]]:
    """(config, display name, tag -> {step: value}) of the one offline run in ``run_dir``."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    config, name, history = {}, None, {}
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            name = rec.run.display_name
            config = {u.key: json.loads(u.value_json) for u in rec.run.config.update
                      if u.key != "_wandb"}
        elif kind == "history":
            item = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.history.item}
            for tag, value in item.items():
                if not tag.startswith("_"):
                    history.setdefault(tag, {})[item["_step"]] = value
    return config, name, history


def test_wandb_offline_runs_of_one_process_each_hold_their_rows(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")  # the sink stays offline all the same
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    runs = {tmp_path / "sweep" / str(i): _rows(1, 8) for i in range(3)}
    (a, rows_a), (b, rows_b), (c, rows_c) = runs.items()
    open_together = [MetricSinks(["wandb"], d, CONFIG, d.name) for d in (a, b)]
    for row_a, row_b in zip(rows_a, rows_b):  # interleaved: neither run may take the other's
        open_together[0].log(row_a)
        open_together[1].log(row_b)
    for sinks in open_together:
        sinks.close()
    _log(["wandb"], c, rows_c)  # the next run of a sweep, after the others closed
    for run_dir, rows in runs.items():
        want = (CONFIG, run_dir.name, _expected(rows))
        assert _wandb_run_eventually(run_dir, want) == want


def _wandb_run_eventually(run_dir: Path, want, seconds: float = 20.0):
    """``_wandb_run`` once it equals ``want``, or its last reading after ``seconds``: wandb's
    service process may still be writing the file when ``finish()`` has returned (seen once
    in a full-suite run on a loaded machine)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            got = _wandb_run(run_dir)
        except Exception:  # noqa: BLE001 - not there or partly written yet; the end asserts
            got = None
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_a_task_run_with_train_logger_shows_in_tensorboard(tmp_path):
    """The trainer's wiring: every metrics.jsonl row of a real (task) run, baseline included,
    is in the run folder's event files at its step."""
    import composer
    from composer.run.records import read_metrics
    from composer.run.train import run
    recipe = composer.load_recipe("config", overrides=[
        "data=mqar", "data.seq_len=16", "data.num_pairs=2", "data.test_size=8",
        "model.d_model=16", "model.n_layers=1", "train.batch_size=2", "train.steps=4",
        "train.eval_every=2", "train.log_every=1", "train.progress=false",
        "train.logger=tensorboard"])
    d = tmp_path / "run"
    run(recipe, d)
    want: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(d / "metrics.jsonl"):
        for tag, value in scalar_tags(row).items():
            want.setdefault(tag, []).append((row["step"], value))
    got = _scalars(_tensorboard(d))
    assert {"train/loss", "val/acc", "misc/chance_acc"} <= set(got)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6)
