"""``hycomp generate``: from a run folder or a checkpoint folder, streamed or as JSON, greedy or
seeded sampling; every bad input exits 2 with what / where / why / fix and no traceback."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import composer
from composer.cli.main import main
from composer.run.generate import load_model
from composer.run.train import run as train_run

ROOT = Path(__file__).resolve().parents[2]
MAX_SEQ_LEN = 64
# a Mamba-2 layer and a global attention layer (a KV cache that grows: a position limit)
TINY = ["model.d_model=32", "model.n_layers=2", "model.schedule.ratio=1:1",
        f"model.max_seq_len={MAX_SEQ_LEN}", "data.max_bytes=100000", "data.seq_len=32",
        "train.batch_size=4", "train.steps=2", "train.warmup_steps=1", "train.eval_every=2",
        "train.ckpt_every=2", "train.eval_batches=1", "train.progress=false",
        "train.threads=1", "train.sample_tokens=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder of a 2-step run (its checkpoint: checkpoints/step_000002)."""
    d = tmp_path_factory.mktemp("gen") / "run"
    train_run(composer.load_recipe("config", TINY), d)
    assert not (d / "sample.txt").exists()              # train.sample_tokens=0: no sample
    return d


def hycomp(args, capsys, stdin: bytes | None = None, monkeypatch=None):
    """Run ``hycomp generate ...`` in this process: (exit code, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    try:
        rc = main(["generate", *map(str, args)])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def as_json(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def random_prompt(n: int) -> str:
    """n random printable ASCII characters (fresh each test: the global seed is per test)."""
    return "".join(chr(c) for c in torch.randint(32, 127, (n,)).tolist())


def test_streamed_text_equals_the_json_text_from_run_and_checkpoint_folder(trained, capsys):
    prompt = random_prompt(7) + "é"                      # a multi-byte character in the prompt
    ckpt = trained / "checkpoints" / "step_000002"
    rc, streamed, err = hycomp([trained, "--prompt", prompt, "-n", 20, "--greedy"], capsys)
    assert rc == 0, err
    assert str(ckpt) in err
    rc, out, _ = hycomp([ckpt, "--prompt", prompt, "-n", 20, "--greedy", "--json"], capsys)
    assert rc == 0
    (r,) = as_json(out)
    assert streamed == prompt + r["text"] + "\n"
    assert r["prompt"] == prompt and r["prompt_tokens"] == len(prompt.encode())
    assert r["new_tokens"] == len(r["tokens"]) == 20
    assert bytes(r["tokens"]).decode("utf-8", errors="replace") == r["text"]
    assert r["prefill_ms"] > 0 and r["ms_per_token"] > 0
    # the cache of one sequence at prompt + new tokens: what `hycomp check -T` reports
    model, _ = load_model(ckpt)
    T = r["prompt_tokens"] + 20
    assert r["cache_bytes"] == sum(a["state_bytes"](T) for _, a in model.graph.nodes(data=True))


def test_greedy_from_the_cli_equals_model_generate(trained, capsys):
    prompt = random_prompt(11)
    rc, out, _ = hycomp([trained, "--prompt", prompt, "-n", 16, "--greedy", "--json"], capsys)
    assert rc == 0
    model, _ = load_model(trained)
    ids = torch.tensor([list(prompt.encode())])
    want = model.generate(ids, max_new_tokens=16)[0, ids.shape[1]:].tolist()
    assert as_json(out)[0]["tokens"] == want
    # temperature 0 is greedy too
    rc, out, _ = hycomp([trained, "--prompt", prompt, "-n", 16, "--temperature", 0, "--json"],
                        capsys)
    assert as_json(out)[0]["tokens"] == want


def test_seeded_sampling_is_reproducible_and_seeds_differ(trained, capsys):
    prompt = random_prompt(5)

    def tokens(seed):
        rc, out, _ = hycomp([trained, "--prompt", prompt, "-n", 24, "--seed", seed, "--json",
                             "--temperature", 1.0, "--top-k", 0, "--top-p", 1.0], capsys)
        assert rc == 0
        return as_json(out)[0]["tokens"]

    assert tokens(0) == tokens(0)
    assert tokens(0) != tokens(1)


def test_prompt_file_in_batches_equals_each_prompt_alone(trained, capsys, tmp_path):
    prompts = [random_prompt(n) for n in (3, 9, 5)]
    f = tmp_path / "prompts.txt"
    f.write_text(prompts[0] + "\r\n\n" + "\n".join(prompts[1:]) + "\n")   # CRLF, an empty line
    rc, out, _ = hycomp([trained, "--prompt-file", f, "-n", 8, "--greedy", "--json",
                         "--batch-size", 2], capsys)
    assert rc == 0
    got = as_json(out)
    assert [r["prompt"] for r in got] == prompts
    for p, r in zip(prompts, got):
        _, one, _ = hycomp([trained, "--prompt", p, "-n", 8, "--greedy", "--json"], capsys)
        assert as_json(one)[0]["tokens"] == r["tokens"], p
    rc, text, _ = hycomp([trained, "--prompt-file", f, "-n", 8, "--greedy", "--batch-size", 2],
                         capsys)
    blocks = text.split("=== ")[1:]
    assert [b.split(" ===\n", 1)[0] for b in blocks] == ["1/3", "2/3", "3/3"]
    assert [b.split(" ===\n", 1)[1] for b in blocks] == [
        r["prompt"] + r["text"] + "\n" for r in got]


def test_prompt_from_stdin(trained, capsys, monkeypatch):
    prompt = random_prompt(6) + "\n" + random_prompt(4) + "\n"      # newlines stay in
    rc, piped, err = hycomp([trained, "--prompt", "-", "-n", 10, "--greedy"], capsys,
                            stdin=prompt.encode(), monkeypatch=monkeypatch)
    assert rc == 0, err
    _, direct, _ = hycomp([trained, "--prompt", prompt, "-n", 10, "--greedy"], capsys)
    assert piped == direct and piped.startswith(prompt)


def _truncated(trained, tmp_path):
    ckpt = tmp_path / "cut"
    shutil.copytree(trained / "checkpoints" / "step_000002", ckpt)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ckpt


def _other_model(trained, tmp_path):
    ckpt = tmp_path / "other"
    shutil.copytree(trained / "checkpoints" / "step_000002", ckpt)
    recipe = json.loads((ckpt / "recipe.json").read_text())
    recipe["model"]["d_model"] = 48
    (ckpt / "recipe.json").write_text(json.dumps(recipe))
    return ckpt


def _file(tmp_path, data: bytes):
    f = tmp_path / "prompts.txt"
    f.write_bytes(data)
    return f


def _binary(tmp_path):
    noise = bytes(torch.randint(128, 256, (64,), dtype=torch.uint8).tolist())
    return _file(tmp_path, b"a fine first line\n" + noise)


LONG = "x" * 40     # + 30 new tokens > the model's 64 positions


@pytest.mark.parametrize("make,args,stdin,words", [
    (lambda d, t: "/no/such/run", ["--prompt", "a"], None, "run or checkpoint folder not found"),
    (lambda d, t: t, ["--prompt", "a"], None, "no checkpoint in"),
    (_truncated, ["--prompt", "a"], None, "checkpoint file is damaged"),
    (_other_model, ["--prompt", "a"], None, "checkpoint does not fit the model"),
    (None, [], None, "no prompt"),
    (None, ["--prompt", ""], None, "empty prompt"),
    (None, ["--prompt", "-"], b"", "empty prompt"),
    (None, ["--prompt", "-"], b"ok\xff\xfe", "not UTF-8 text"),
    (None, ["--prompt-file", _binary], None, "prompts.txt:2"),
    (None, ["--prompt-file", lambda t: _file(t, b"one\ntwo\x00\n")], None, "NUL"),
    (None, ["--prompt-file", lambda t: _file(t, b"\n\r\n\n")], None, "empty prompt"),
    (None, ["--prompt-file", lambda t: t / "missing.txt"], None, "cannot read the prompt file"),
    (None, ["--prompt", LONG, "-n", 30], None, "--max-new-tokens 24 or fewer"),
    (None, ["--prompt", "x" * 70, "-n", 1], None, "shorten the prompt to under 64 bytes"),
    (None, ["--prompt", "a", "--temperature", -0.5], None, "bad --temperature -0.5"),
    (None, ["--prompt", "a", "--top-p", 0], None, "must lie in (0, 1]"),
    (None, ["--prompt", "a", "--top-p", 1.5], None, "bad --top-p 1.5"),
    (None, ["--prompt", "a", "--top-k", -1], None, "bad --top-k -1"),
    (None, ["--prompt", "a", "--top-k", -1, "--top-p", 2], None, "2 bad sampling settings"),
    (None, ["--prompt", "a", "-n", 0], None, "bad --max-new-tokens 0"),
    (None, ["--prompt", "a", "--batch-size", 0], None, "bad --batch-size 0"),
    (None, ["--prompt", "a", "--prefill-chunk-size", -3], None, "bad --prefill-chunk-size -3"),
], ids=["missing-run", "no-checkpoint", "truncated", "other-model", "no-prompt",
        "empty-prompt", "empty-stdin", "binary-stdin", "binary-file", "nul-file",
        "blank-file", "missing-file", "past-positions", "prompt-past-positions",
        "temperature", "top-p-0", "top-p-1.5", "top-k", "two-bad", "max-new-tokens",
        "batch-size", "prefill-chunk"])
def test_bad_input_exits_2_with_what_where_why_fix(trained, tmp_path, capsys, monkeypatch,
                                                   make, args, stdin, words):
    target = make(trained, tmp_path) if make else trained
    args = [a(tmp_path) if callable(a) else a for a in args]
    rc, out, err = hycomp([target, *args], capsys, stdin=stdin, monkeypatch=monkeypatch)
    assert rc == 2, err
    assert words in err and "fix:" in err and "Traceback" not in err, err
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_device_is_refused(trained, capsys):
    rc, _, err = hycomp([trained, "--prompt", "a", "--device", "cuda"], capsys)
    assert rc == 2 and "no CUDA device" in err and "--device cuda" in err


def test_in_a_real_process_stdin_streams_and_bad_input_has_no_traceback(trained, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "composer.cli.main", "generate", str(trained)]
    p = subprocess.run(cmd + ["--prompt", "-", "-n", "6", "--greedy"], input=b"import os\n",
                       capture_output=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(b"import os\n") and b"Traceback" not in p.stderr
    cut = _truncated(trained, tmp_path)
    p = subprocess.run(cmd[:-1] + [str(cut), "--prompt", "a"], capture_output=True, env=env,
                       timeout=120)
    assert p.returncode == 2 and b"Traceback" not in p.stderr
    assert b"damaged" in p.stderr and b"fix:" in p.stderr
