"""composer.run.compare and compare_plots: finding runs, labels by what differs, costs against
an independent count, best-over groups, the Pareto front against a brute-force check, the
files written, and plots that leave out missing values with a note."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import composer
from composer.build.costs import totals
from composer.core.errors import HycompError
from composer.run.compare import attention_share, collect, compare, differences, short_names
from composer.run.compare_table import cell, si, write
from composer.run.compare_plots import pareto_front, plot_all
from composer.run.train import run
from helpers import tiny_run

TINY = tiny_run(steps=4)
JOBS = [["model.schedule.ratio=1:1", "train.lr=0.001"],
        ["model.schedule.ratio=1:1", "train.lr=0.01"],
        ["model.schedule.ratio=3:1", "train.lr=0.001"],
        ["model.schedule.ratio=3:1", "train.lr=0.01"]]
LABELS = ["ratio=1:1, lr=0.001", "ratio=1:1, lr=0.01", "ratio=3:1, lr=0.001",
          "ratio=3:1, lr=0.01"]
EVAL = {"step": 4, "checkpoint": "checkpoints/step_000004",
        "results": [{"task": "mqar", "seq_len": 512, "loss": 0.9, "accuracy": 0.875, "bpb": None,
                     "n": 64},
                    {"task": "mqar", "seq_len": 1024, "loss": 1.7, "accuracy": 0.5, "bpb": None,
                     "n": 64}]}


def summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def edit_summary(d: Path, drop=(), **fields) -> None:
    """Set (or ``drop``) summary.json fields: simulates the fields the trainer is being
    extended to write (task, val_acc, best_val_acc, overrides), so that these tests cover task
    runs and both places overrides are read from, whatever the trainer writes today."""
    s = {k: v for k, v in summary(d).items() if k not in drop}
    (d / "summary.json").write_text(json.dumps({**s, **fields}))


@pytest.fixture(scope="session")
def sweep(tmp_path_factory) -> Path:
    """Four tiny text runs of the real trainer laid out as `hycomp train -m` does:
    <sweep>/<job>/ with .hydra/overrides.yaml (summary.json without ``overrides``)."""
    root = tmp_path_factory.mktemp("compare") / "multirun" / "2026-12-05" / "10-00-00"
    for i, job in enumerate(JOBS):
        d = root / str(i)
        run(composer.load_recipe("config", TINY + job), d)
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(job))
        edit_summary(d, drop=("overrides", "label", "task", "val_acc", "best_val_acc"))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


@pytest.fixture(scope="session")
def task_sweep(sweep, tmp_path_factory) -> Path:
    """The sweep's runs as MQAR runs (simulated: task, val_acc, best_val_acc and overrides
    written into summary.json, val_acc into metrics.jsonl; no .hydra/); runs 0 and 1 tie on
    accuracy, and run 3 has an eval.json."""
    root = tmp_path_factory.mktemp("tasks")
    accs = torch.rand(len(JOBS), generator=torch.Generator().manual_seed(1)).tolist()
    accs[1] = accs[0]
    for i, job in enumerate(JOBS):
        d = root / f"job{i}"
        shutil.copytree(sweep / str(i), d)
        shutil.rmtree(d / ".hydra")
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            if "val_loss" in r:
                r.pop("val_bpb", None)
                r["val_acc"] = accs[i] * r["step"] / 4
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        edit_summary(d, drop=("val_bpb", "unigram_bpb"), task="mqar", val_acc=accs[i],
                     best_val_acc=accs[i], overrides=job)
    (root / "job3" / "eval.json").write_text(json.dumps(EVAL))
    return root


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------
# Finding runs
# --------------------------------------------------------------------------------------------
def test_a_sweep_gives_its_jobs_in_job_order_once(sweep, tmp_path):
    jobs = tmp_path / "sweep"
    for name, src in (("10", 3), ("2", 2), ("1", 1)):
        copy_run(sweep / str(src), jobs / name)
    recs = collect([str(jobs), str(jobs / "2"), str(tmp_path / "sw*" / "1*")])
    assert [r.name for r in recs] == ["1", "2", "10"]          # numbers, not text order
    assert [r.path for r in collect([str(jobs / "10"), str(jobs / "1")])] == [jobs / "10",
                                                                             jobs / "1"]


@pytest.mark.parametrize("where", ["missing", "file", "empty", "glob"])
def test_a_path_without_runs_is_an_error(where, sweep, tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("x")
    path = {"missing": tmp_path / "nope", "file": tmp_path / "notes.txt",
            "empty": tmp_path / "empty", "glob": tmp_path / "zz*"}[where]
    with pytest.raises(HycompError) as e:
        collect([str(sweep / "0"), str(path)])
    assert e.value.where == str(path) and e.value.fix and e.value.exit_code == 2


def test_unreadable_runs_are_skipped_with_a_note(sweep, tmp_path):
    good = copy_run(sweep / "0", tmp_path / "a" / "good")
    (copy_run(sweep / "0", tmp_path / "a" / "corrupt") / "summary.json").write_text("{")
    shutil.rmtree(copy_run(sweep / "0", tmp_path / "a" / "nockpt") / "checkpoints")
    running = copy_run(sweep / "0", tmp_path / "a" / "running")
    (running / "summary.json").unlink()
    notes: list[str] = []
    assert [r.path for r in collect([str(tmp_path / "a")], notes)] == [good]
    assert len(notes) == 3
    for name in ("corrupt", "nockpt", "running"):
        assert any(f"skipped {tmp_path / 'a' / name}" in n for n in notes), name
    shutil.rmtree(good)
    with pytest.raises(HycompError, match="no run to compare"):
        collect([str(tmp_path / "a")])


# --------------------------------------------------------------------------------------------
# What differs
# --------------------------------------------------------------------------------------------
def test_labels_name_what_the_overrides_change(sweep):
    cmp = compare(collect([str(sweep)]), best_over=None)
    assert cmp.varies == ["model.schedule.ratio", "train.lr"]
    assert [r["label"] for r in cmp.rows] == LABELS
    assert [r["model.schedule.ratio"] for r in cmp.rows] == ["1:1", "1:1", "3:1", "3:1"]


def test_without_overrides_labels_come_from_the_recipes(sweep, tmp_path):
    for i in range(len(JOBS)):
        d = copy_run(sweep / str(i), tmp_path / f"by_hand_{i}")
        shutil.rmtree(d / ".hydra")
    recs = collect([str(tmp_path)])
    assert all(r.overrides is None for r in recs)
    keys, shown, _ = differences(recs)
    assert keys == ["model.schedule.ratio", "train.lr"]
    assert [r["label"] for r in compare(recs, best_over=None).rows] == LABELS


def test_an_override_equals_the_recipe_value_it_spells(sweep, tmp_path):
    # one run's lr written 1e-2 on its command line, the other run at the recipe's 0.01
    a, b = copy_run(sweep / "1", tmp_path / "a"), copy_run(sweep / "3", tmp_path / "b")
    (a / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["train.lr=1e-2",
                                                                 "model.schedule.ratio=1:1"]))
    (b / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([]))
    keys, shown, _ = differences(collect([str(a), str(b)]))
    assert keys == ["model.schedule.ratio"] and [s[keys[0]] for s in shown] == ["1:1", "3:1"]


def test_equal_labels_get_the_folder_name(sweep, tmp_path):
    for name, src in (("x", 0), ("y", 0), ("z", 1)):
        copy_run(sweep / str(src), tmp_path / name)
    rows = compare(collect([str(tmp_path)]), best_over=None).rows
    assert [r["label"] for r in rows] == ["lr=0.001 (x)", "lr=0.001 (y)", "lr=0.01"]


def test_short_names_cut_keys_while_they_stay_distinct():
    keys = ["model.schedule.ratio", "train.lr", "model.blocks.attention.window",
            "model.blocks.local.window"]
    assert short_names(keys) == {"model.schedule.ratio": "ratio", "train.lr": "lr",
                                 "model.blocks.attention.window": "attention.window",
                                 "model.blocks.local.window": "local.window"}


# --------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context", [None, 4096])
def test_costs_match_the_model_and_the_cost_model(sweep, context):
    recs = collect([str(sweep)])
    rows = compare(recs, context=context, best_over=None).rows
    for rec, row in zip(recs, rows):
        recipe = composer.validate_recipe(json.loads((rec.checkpoint / "recipe.json")
                                                     .read_text()))
        T = context or recipe.data.seq_len
        want = totals(composer.layer_graph(recipe), T)
        assert row["params"] == sum(p.numel() for p in composer.build_model(recipe).parameters())
        assert row["params"] == summary(rec.path)["params"]
        assert row["flops_per_token"] == want["flops_per_token"] and row["context"] == T
        assert row["state_bytes"] == want["state_bytes"]
        pattern = recipe.schedule.pattern               # "*": attention, "-": FFN
        assert row["schedule"] == pattern
        assert row["attention_share"] == pattern.count("*") / sum(c != "-" for c in pattern)


def _share(layers: list[str], blocks: dict | None = None) -> float | None:
    d = composer.compose_dict("config", ["model.d_model=32"])
    d["model"]["blocks"].update(blocks or {})
    d["model"].update(n_layers=len(layers), schedule={"layers": layers})
    return attention_share(composer.layer_graph(composer.validate_recipe(d)))


@pytest.mark.parametrize("layers, blocks, want", [
    (["attention", "mamba2", "mamba2", "mamba2"], None, 1 / 4),
    (["sparse_attention", "block_attention", "linear_attention", "gated_deltanet"], None, 2 / 4),
    # a parallel sub-layer counts the share of its branches that are attention
    (["p", "mamba2"], {"p": {"kind": "parallel", "branches": ["attention", "mamba2"]}}, 1 / 4),
    # a routed sub-layer counts its mixer paths; one of FFN paths alone is no mixer
    (["r", "mamba2"], {"r": {"kind": "routed", "mode": "choice",
                             "paths": ["attention", "mamba2"]}}, 1 / 4),
    (["r", "attention"], {"r": {"kind": "routed"}}, 1.0),
    # short convolutions (Zoology's companion of each mixer) are not counted
    (["base_conv", "attention", "base_conv", "mamba2"], None, 1 / 2),
])
def test_attention_share(layers, blocks, want):
    assert _share(layers, blocks) == pytest.approx(want)


# --------------------------------------------------------------------------------------------
# Best over a key, results
# --------------------------------------------------------------------------------------------
def test_best_over_lr_keeps_the_lowest_loss_of_each_ratio(sweep):
    cmp = compare(collect([str(sweep)]))
    losses = [summary(sweep / str(i))["val_loss"] for i in range(len(JOBS))]
    for row, members in zip(cmp.rows, ([0, 1], [2, 3])):
        best = min(members, key=lambda i: losses[i])
        assert row["path"] == str(sweep / str(best)) and row["tried"] == 2
        assert row["best train.lr"] == JOBS[best][1].split("=")[1]
        assert row["val_loss"] == losses[best] and "train.lr" not in row
    assert [r["label"] for r in cmp.rows] == ["ratio=1:1", "ratio=3:1"]
    assert len(cmp.all_rows) == 4 and cmp.settings["best_over"] == "train.lr"
    assert ("best train.lr", "best lr") in cmp.columns
    assert [r["path"] for r in compare(collect([str(sweep)]), best_over="lr").rows] == \
        [r["path"] for r in cmp.rows]                   # the short name works too


def test_best_over_lr_keeps_the_highest_accuracy_ties_to_the_lower_loss(task_sweep):
    cmp = compare(collect([str(task_sweep)]))
    s = [summary(task_sweep / f"job{i}") for i in range(len(JOBS))]
    assert s[0]["val_acc"] == s[1]["val_acc"]
    for row, members in zip(cmp.rows, ([0, 1], [2, 3])):
        best = max(members, key=lambda i: (s[i]["val_acc"], -s[i]["val_loss"]))
        assert row["path"] == str(task_sweep / f"job{best}") and row["tried"] == 2
        assert row["val_acc"] == s[best]["val_acc"] and row["val_bpb"] is None
    headers = [h for _, h in cmp.columns]
    assert "val acc" in headers and "best acc" in headers and "val bpb" not in headers


def test_best_over_none_keeps_every_run(sweep):
    cmp = compare(collect([str(sweep)]), best_over=None)
    assert len(cmp.rows) == 4 and cmp.rows == cmp.all_rows and cmp.settings["best_over"] is None


def test_eval_json_accuracies_are_columns(task_sweep):
    rows = compare(collect([str(task_sweep)]), best_over=None).rows
    assert rows[3]["acc mqar@512"] == 0.875 and rows[3]["acc mqar@1024"] == 0.5
    assert "acc mqar@512" not in rows[0]


def test_values_missing_from_the_summary_come_from_the_metrics(sweep, tmp_path):
    d = copy_run(sweep / "0", tmp_path / "run")
    edit_summary(d, drop=("val_loss", "best_val_loss", "val_bpb"))
    row = compare(collect([str(d)])).rows[0]
    vals = [json.loads(x)["val_loss"] for x in (d / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in x]
    assert row["val_loss"] == vals[-1] and row["best_val_loss"] == min(vals)
    assert row["val_bpb"] == pytest.approx(vals[-1] / math.log(2))


# --------------------------------------------------------------------------------------------
# Pareto front, formats, files, plots
# --------------------------------------------------------------------------------------------
def _brute_front(points, higher):
    s = 1 if higher else -1
    return {i for i, (x, y) in enumerate(points)
            if not any(xj <= x and s * yj >= s * y and (xj < x or s * yj > s * y)
                       for xj, yj in points)}


@pytest.mark.parametrize("n", [1, 2, 7, 40])
@pytest.mark.parametrize("higher", [True, False])
def test_pareto_front_equals_the_brute_force_one(n, higher):
    for ties in (True, False):                  # small integers: many equal costs and scores
        pts = (torch.randint(0, 5, (n, 2)).float() if ties else torch.rand(n, 2)).tolist()
        front = pareto_front([tuple(p) for p in pts], higher_is_better=higher)
        assert set(front) == _brute_front(pts, higher) and len(front) == len(set(front))
        assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)


def test_numbers_are_formatted_for_reading():
    assert si(1_234_567) == "1.23M" and si(4.5e9, "FLOP") == "4.5 GFLOP" and si(999.96) == "1K"
    assert cell("state_bytes", 12.3 * 1024) == "12.3 KiB" and cell("val_acc", 0.971) == "97.1%"
    assert cell("wall_s", 185) == "3m 05s" and cell("val_loss", float("nan")) == "-"
    assert cell("schedule", "M-*-") == "`M-*-`" and cell("attention_share", 0.25) == "25.0%"


def test_files_hold_the_table(sweep, tmp_path):
    cmp = compare(collect([str(sweep)]))
    paths = write(cmp, tmp_path)
    assert sorted(p.name for p in paths) == ["compare.csv", "compare.json", "compare.md",
                                             "compare_all.csv", "compare_all.md"]
    md = (tmp_path / "compare.md").read_text()
    assert "| run | schedule | ratio | best lr | tried | params |" in md
    assert md.count("\n| ratio=") == 2 and (tmp_path / "compare_all.md").read_text().count(
        "\n| ratio=") == 4
    rows = list(csv.DictReader(open(tmp_path / "compare_all.csv")))
    assert [float(r["val_loss"]) for r in rows] == [r["val_loss"] for r in cmp.all_rows]
    assert [int(r["state_bytes"]) for r in rows] == [r["state_bytes"] for r in cmp.all_rows]
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["rows"] == json.loads(json.dumps(cmp.rows)) and data["notes"] == cmp.notes
    assert data["settings"]["varies"] == ["model.schedule.ratio", "train.lr"]


def test_plots_leave_out_missing_values_with_a_note(task_sweep, sweep, tmp_path):
    failed = copy_run(task_sweep / "job2", tmp_path / "runs" / "failed")
    edit_summary(failed, status="failed", val_acc=None, best_val_acc=None, val_loss=None)
    (failed / "metrics.jsonl").write_text('{"step": 0, "params": 1}\n')
    for i in (0, 3):
        copy_run(task_sweep / f"job{i}", tmp_path / "runs" / f"job{i}")
    copy_run(sweep / "1", tmp_path / "runs" / "text")       # a text run beside task runs
    recs = collect([str(tmp_path / "runs")])
    cmp = compare(recs, best_over=None)
    paths, notes = plot_all(cmp, recs, tmp_path)
    assert [p.name for p in paths] == ["loss.png", "pareto.png", "attention_share.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    label = {r["path"]: r["label"] for r in cmp.rows}
    for picture in ("pareto.png", "attention_share.png"):
        for left_out in (failed, tmp_path / "runs" / "text"):
            assert any(picture in n and label[str(left_out)] in n for n in notes), picture
    assert any("loss.png" in n and label[str(failed)] in n for n in notes)


def test_runs_on_different_data_settings_get_separate_fronts():
    from composer.run.compare import Comparison
    from composer.run.compare_plots import data_groups
    rows = [{"task": "mqar", "data.num_pairs": p, "label": f"num_pairs={p}, pattern={s}"}
            for p, s in ((4, "C**"), (8, "C**"), (4, "CMM"), (8, "CMM"))]
    cmp = Comparison(rows=rows, all_rows=rows, columns=[], all_columns=[],
                     varies=["data.num_pairs", "model.schedule.pattern"],
                     short={"data.num_pairs": "num_pairs", "model.schedule.pattern": "pattern"},
                     notes=[], settings={})
    assert data_groups(cmp, rows) == [("num_pairs=4", [0, 2]), ("num_pairs=8", [1, 3])]
    cmp.varies = ["model.schedule.pattern"]        # the data is the same for all: one group
    assert data_groups(cmp, rows) == [("", [0, 1, 2, 3])]
