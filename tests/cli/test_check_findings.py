"""Issue 13: check / viz / train agree on what they refuse, answer every bad input with
what / where / why / fix and exit 2, and say what may surprise (depth changes, adjacent
minority entries, settings that make layers differ)."""
import json
import re

import pytest
import torch

from composer.cli.main import main


def run(args, capsys):
    try:
        rc = main(list(args))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("args,words", [
    (["check", "-T", "0"], "bad context length 0"),
    (["check", "-T", "-5"], "bad context length -5"),
    (["viz", "-T", "0", "--formats", "mmd"], "bad context length 0"),
    (["check", "-r", "/bin/ls"], "not a recipe file"),
    (["check", "model.d_model=1000000000"], "too large"),
    (["check", "kernels.gated_linear_recurrence=scan"], "does not handle this call"),
    (["viz", "--formats", "mmd", "kernels.gated_linear_recurrence=scan"],
     "does not handle this call"),
    (["check", "model.symbols.ZZ=attention"], "bad pattern symbol 'ZZ'"),
])
def test_refused_with_exit_2(args, words, capsys):
    rc, out, err = run(args, capsys)
    assert rc == 2 and words in err and "fix:" in err, err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("cmd", ["check", "viz"])
def test_check_and_viz_refuse_a_missing_device_as_train_does(cmd, capsys, tmp_path):
    rc, _, err = run([cmd, "train.device=cuda", *(["-o", str(tmp_path), "--formats", "mmd"]
                                                  if cmd == "viz" else [])], capsys)
    assert rc == 2 and "no CUDA device" in err


def test_viz_into_an_existing_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    rc, _, err = run(["viz", "-o", str(f), "--formats", "mmd"], capsys)
    assert rc == 2 and "is not a folder" in err and f.read_text() == "x"


def test_depth_change_is_said(capsys):
    rc, out, err = run(["check", "model.schedule.pattern=M-M-M*-"], capsys)
    assert rc == 0 and "note: depth 4 -> 7" in err and "model.n_layers=4" in err
    rc, out, err = run(["check", "model.schedule.pattern=M-M-M*-", "model.n_layers=14"], capsys)
    assert rc == 0 and "depth" not in err


def test_even_placement_points_to_period_when_minority_entries_touch(capsys):
    rc, out, err = run(["check", "model.schedule.ratio=1:1", "model.n_layers=4"], capsys)
    assert rc == 0 and "M-*-*-M-" in out and "placement=period" in err
    rc, out, err = run(["check", "model.schedule.ratio=3:1", "model.n_layers=12"], capsys)
    assert rc == 0 and "placement" not in err


def test_local_and_global_attention_rows_differ(capsys):
    rc, out, _ = run(["check", "-r", "gemma3_tiny"], capsys)
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^(\d+) .*?attention\s+[\d,]+\s+(.*)$",
                                                        out, re.M)}
    assert "window=64" in rows["0"] and "rope_theta=1000000.0" in rows["10"]
    assert rows["0"] != rows["10"]
    rc, out, _ = run(["check", "-r", "gemma3_tiny", "--json"], capsys)
    subs = json.loads(out)["sublayers"]
    assert "window" not in subs[10]["settings"] and subs[10]["fields"]["window"] is None
    assert subs[0]["settings"]["window"] == 64
    assert "d_conv" not in subs[1]["fields"] and len(subs[0]["fields"]) > len(
        subs[0]["settings"])


def test_deep_check_table_is_cut(capsys):
    rc, out, _ = run(["check", "model.n_layers=500"], capsys)
    assert rc == 0 and "936 sub-layers not shown" in out and len(out.splitlines()) < 80
    assert "L999" in out


def test_train_refuses_what_check_refuses(capsys):
    rc, _, err = run(["train", "kernels.gated_linear_recurrence=scan", "train.steps=1"], capsys)
    assert rc == 2 and "does not handle this call" in err
