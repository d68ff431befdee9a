"""Kill a training run at random moments and resume it; check nothing is lost.

    python tools/kill_resume.py --kills 10 --seed 0

1. An uninterrupted run of a tiny recipe (``--steps`` steps, a checkpoint every
   ``--ckpt-every``) with ``hycomp train``.
2. The same recipe in another folder, SIGKILLed ``--kills`` times, each at a random moment
   (seeded, uniform in [0, the time its remaining steps take / the kills left]) after the
   (re)started process did its first step; after each kill every ``checkpoints/step_*`` folder on disk is
   loaded with the checkpoint loader (model and optimizer, sha256 checked) and
   ``checkpoints/latest`` resolved. Each restart resumes the folder (``train.resume=``) or, when
   no checkpoint was written yet, starts it again.
3. Resumed until it completes; then (a) its final train and validation losses must equal the
   uninterrupted run's (to 1e-6; on CPU they are bitwise equal) and (b) no checkpoint seen on
   disk was ever unreadable. Prints the counts; exit status 0 when both hold, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.n_layers=2", "data.max_bytes=200000", "data.seq_len=32",
        "train.batch_size=4", "train.eval_every=10", "train.eval_batches=2", "train.log_every=1",
        "train.progress=false", "train.threads=1", "train.keep_checkpoints=3",
        "train.warmup_steps=4"]


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "composer.cli.main", "train", *args]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def verify_checkpoints(run: Path) -> tuple[int, list[str]]:
    """(checkpoints loaded, problems): every step_* folder, and checkpoints/latest."""
    import torch

    import composer
    from composer.core.errors import HycompError
    from composer.recipe.validate import validate_recipe
    from composer.run.checkpoint import latest_checkpoint, load_checkpoint, read_recipe
    from composer.run.train import param_groups
    ckpts = run / "checkpoints"
    folders = sorted(p for p in ckpts.glob("step_*")) if ckpts.is_dir() else []
    problems = []
    for f in folders:
        try:
            recipe = validate_recipe(read_recipe(f))
            model = composer.build_model(recipe)
            opt = torch.optim.AdamW(param_groups(model, 0.1))
            load_checkpoint(f, model, opt)
        except HycompError as e:
            problems.append(f"{f.name}: {e.what}: {e.why}")
    if folders:
        try:
            latest_checkpoint(run)
        except HycompError as e:
            problems.append(f"latest: {e.what}: {e.why}")
    return len(folders), problems


def _rows(run: Path) -> list[dict]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(x) for x in lines if x.strip()]


def _last_step(run: Path) -> int:
    """The last step with a train row in metrics.jsonl (0 when none)."""
    return max((r["step"] for r in _rows(run) if "loss" in r), default=0)


def _wait_for_training(proc: subprocess.Popen, run: Path, before: int) -> None:
    """Until the (re)started run has done a step past ``before`` (or has ended): the start-up
    of a process takes seconds, and a kill is meant to land while it trains."""
    while proc.poll() is None:
        try:
            if _last_step(run) > before:
                return
        except ValueError:  # a line being written
            pass
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ckpt-every", type=int, default=3)
    ap.add_argument("--max-wait", type=float, default=None,
                    help="kill at a uniform moment in [0, this] seconds after a (re)started run "
                         "has done its first step (default: the time the steps left take, "
                         "measured on the uninterrupted run, over the kills left)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    a = ap.parse_args()

    work = Path(a.dir or tempfile.mkdtemp(prefix="kill_resume-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = TINY + [f"train.steps={a.steps}", f"train.ckpt_every={a.ckpt_every}",
                     f"train.seed={a.seed}"]
    straight, killed = work / "straight", work / "killed"
    t = time.time()
    p = subprocess.run(_cmd(recipe + [f"hydra.run.dir={straight}"]), cwd=work, env=_env(),
                       capture_output=True, text=True)
    if p.returncode:
        print(p.stderr, file=sys.stderr)
        return 1
    rows = [r for r in _rows(straight) if "loss" in r]
    per_step = rows[-1]["elapsed"] / rows[-1]["step"]
    print(f"uninterrupted run: {time.time() - t:.1f} s, {per_step:.3f} s per step")

    rng = random.Random(a.seed)
    counts = {"kills": 0, "kills_before_first_checkpoint": 0, "finished_before_kill": 0,
              "starts": 0, "resumes": 0, "checkpoint_loads": 0, "unreadable": 0}
    problems: list[str] = []
    done = False

    def start() -> subprocess.Popen:
        counts["starts"] += 1
        if any((killed / "checkpoints").glob("step_*")):
            counts["resumes"] += 1
            args = [f"train.resume={killed}", "train.progress=false"]
        else:
            args = recipe + [f"hydra.run.dir={killed}"]
        return subprocess.Popen(_cmd(args), cwd=work, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    while counts["kills"] < a.kills and not done:
        before = _last_step(killed)
        proc = start()
        left = max(1, a.steps - before) / (a.kills - counts["kills"])  # spread the kills
        wait = rng.uniform(0.0, a.max_wait or per_step * left)
        try:
            _wait_for_training(proc, killed, before)
            proc.wait(timeout=wait)
            err = proc.stderr.read()
            if proc.returncode:
                print(err, file=sys.stderr)
                return 1
            counts["finished_before_kill"] += 1
            done = True
        except subprocess.TimeoutExpired:
            had = any((killed / "checkpoints").glob("step_*"))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            counts["kills"] += 1
            counts["kills_before_first_checkpoint"] += not had
        n, bad = verify_checkpoints(killed)
        counts["checkpoint_loads"] += n
        counts["unreadable"] += len(bad)
        problems += bad
        what = "completed before its kill" if done else f"kill {counts['kills']}: after " \
            f"{wait:.1f} s"
        print(f"{what}; {n} checkpoint(s) on disk, {len(bad)} unreadable")
    while not done:
        proc = start()
        err = proc.communicate()[1]
        if proc.returncode:
            print(err, file=sys.stderr)
            return 1
        done = True

    s0 = json.loads((straight / "summary.json").read_text())
    s1 = json.loads((killed / "summary.json").read_text())
    diffs = {k: abs(s0[k] - s1[k]) for k in ("train_loss", "val_loss")}
    same = all(d <= 1e-6 for d in diffs.values()) and s0["steps"] == s1["steps"]
    bitwise = all(s0[k] == s1[k] for k in diffs)
    for k, v in counts.items():
        print(f"{k:32s}{v}")
    print(f"{'final train_loss':32s}{s1['train_loss']!r} (uninterrupted {s0['train_loss']!r})")
    print(f"{'final val_loss':32s}{s1['val_loss']!r} (uninterrupted {s0['val_loss']!r})")
    print(f"{'losses equal':32s}{'bitwise' if bitwise else same}")
    for line in problems:
        print("unreadable:", line)
    print(f"work folder: {work}")
    return 0 if same and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
