"""``hycomp compare`` through its own parser: the table on stdout, the files in -o, --json,
--context, --best-over, --no-plots; every bad input returns 2 with what / where / why / fix and
no traceback."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import yaml

import composer
from composer.build.costs import totals
from composer.cli.compare import add_parser, main
from composer.run.train import run
from helpers import tiny_run

TINY = tiny_run(steps=2)
JOBS = [["model.schedule.ratio=1:1", "train.lr=0.001"],
        ["model.schedule.ratio=1:1", "train.lr=0.01"],
        ["model.schedule.ratio=3:1", "train.lr=0.01"]]


@pytest.fixture(scope="session")
def sweep(tmp_path_factory) -> Path:
    """Three tiny runs of the real trainer in a `hycomp train -m` layout (<sweep>/<job>/ with
    .hydra/overrides.yaml)."""
    root = tmp_path_factory.mktemp("cli_compare") / "multirun" / "2026-12-05" / "10-00-00"
    for i, job in enumerate(JOBS):
        d = root / str(i)
        run(composer.load_recipe("config", TINY + job), d)
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(job))
    return root


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hycomp")
    add_parser(ap.add_subparsers(dest="command"))
    return ap


def hycomp(args, capsys):
    """``hycomp compare ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        rc = main(parser().parse_args(["compare", *map(str, args)]))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_explains_and_gives_examples():
    text = add_parser(argparse.ArgumentParser(prog="hycomp").add_subparsers()).format_help()
    for part in ("examples:", "hycomp compare runs/multirun/", "--best-over KEY", "--context T",
                 "--no-plots", "--json", "pareto.png", "attention share"):
        assert part in text, part


def test_a_sweep_gives_the_table_files_and_plots(sweep, tmp_path, capsys):
    rc, out, err = hycomp([sweep, "-o", tmp_path / "cmp"], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("| run | schedule | ratio | best lr | tried | params |")
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| ratio=1:1", "| ratio=3:1"]
    assert "2 of 3 runs shown: the best train.lr" in err
    for name in ("compare.md", "compare.csv", "compare.json", "compare_all.md",
                 "compare_all.csv", "loss.png", "pareto.png", "attention_share.png"):
        assert (tmp_path / "cmp" / name).is_file(), name
        assert f"wrote {tmp_path / 'cmp' / name}" in err
    settings = json.loads((tmp_path / "cmp" / "compare.json").read_text())["settings"]
    assert settings["paths"] == [str(sweep)] and settings["best_over"] == "train.lr"


def test_json_rows_every_run_at_a_context(sweep, tmp_path, capsys):
    rc, out, err = hycomp([sweep, "-o", tmp_path, "--json", "--best-over", "none",
                           "--context", "4096", "--no-plots"], capsys)
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["label"] for r in rows] == ["ratio=1:1, lr=0.001", "ratio=1:1, lr=0.01",
                                          "ratio=3:1, lr=0.01"]
    for i, r in enumerate(rows):
        recipe = composer.load_recipe("config", TINY + JOBS[i])
        want = totals(composer.layer_graph(recipe), 4096)
        assert r["context"] == 4096 and r["state_bytes"] == want["state_bytes"]
    assert not list(tmp_path.glob("*.png"))
    assert "| state @4096 |" in (tmp_path / "compare.md").read_text()


@pytest.mark.parametrize("case", ["missing", "empty", "file", "glob", "context-text",
                                  "context-zero", "out-is-a-file"])
def test_bad_input_exits_2_with_what_where_fix(case, sweep, tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "summary.txt").write_text("not a run")
    args = {"missing": [tmp_path / "no_such_sweep"], "empty": [tmp_path / "empty"],
            "file": [tmp_path / "summary.txt"], "glob": [tmp_path / "nothing*"],
            "context-text": [sweep, "--context", "long"], "context-zero": [sweep, "--context", "0"],
            "out-is-a-file": [sweep, "-o", tmp_path / "summary.txt" / "out"]}[case]
    rc, out, err = hycomp(args, capsys)
    assert rc == 2
    for part in ("error:", "where:", "fix:"):
        assert part in err, (part, err)
    assert "Traceback" not in out + err and out == ""
    assert not list(tmp_path.glob("*.md"))


def test_a_damaged_run_is_a_warning_not_a_failure(sweep, tmp_path, capsys):
    shutil.copytree(sweep, tmp_path / "sweep")
    (tmp_path / "sweep" / "1" / "summary.json").write_text("{not json")
    rc, out, err = hycomp([tmp_path / "sweep", "-o", tmp_path / "cmp"], capsys)
    assert rc == 0 and f"warning: skipped {tmp_path / 'sweep' / '1'}" in err
    assert len(json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]) == 2
