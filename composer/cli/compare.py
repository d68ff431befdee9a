"""``hycomp compare RUN_OR_SWEEP ... [-o DIR]``: one table and three plots across runs.

The stages are :mod:`composer.run.compare` (find the runs, what differs, costs, rows, tables)
and :mod:`composer.run.compare_plots`; this module parses the options and reports. Bad input
(a missing folder, one that holds no run, a file, a bad ``--context``) prints what / where /
why / fix and returns 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from composer.core.errors import HycompError

HELP = "compare runs and sweeps: a table of what differs, costs and results, and plots"

EPILOG = """examples:
  hycomp compare runs/multirun/2026-12-05/10-00-00        # a sweep: every job in it
  hycomp compare 'runs/2026-12-05/*' -o compare/dec05     # runs made one by one (a glob)
  hycomp compare SWEEP_A SWEEP_B --context 8192           # costs at 8192 tokens
  hycomp compare SWEEP --best-over none --json            # every run, as JSON rows

A run is a folder holding summary.json and a checkpoint (its recipe.json gives the costs); a
sweep is any folder with runs up to 4 levels below it. Runs are labelled by what differs
between them (their overrides, else their recipes): ratio=3:1, lr=0.001. Columns: the
schedule pattern, one per differing key, parameters, forward FLOPs per token and state bytes
per sequence (recurrent states + KV caches, fp32) at the context, the attention share
(softmax-attention sub-layers / sequence-mixing sub-layers), final and best validation loss,
bits per byte (text) or final and best accuracy (tasks), eval.json's accuracies, tokens/s,
wall time and status.

--best-over KEY (default train.lr): runs that differ only in KEY are one configuration, and
the table keeps its best run (the highest accuracy for tasks, else the lowest validation
loss), saying which value won of how many: recurrent models solve MQAR only in a narrow
learning-rate window, so each configuration is judged at its best learning rate.

Writes into -o (default ./compare): compare.md, compare.csv (raw numbers), compare.json
(rows, notes, settings), compare_all.md / .csv (every run), loss.png, pareto.png (quality
against state, Pareto front marked) and attention_share.png. Prints the Markdown table."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to ``subparsers`` (argparse's ``add_subparsers``)."""
    p = subparsers.add_parser("compare", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP",
                   help="run folders, sweep folders (runs/multirun/<date>/<time>) or quoted "
                        "glob patterns")
    p.add_argument("-o", "--out", default="compare", metavar="DIR",
                   help="output folder (default: ./compare)")
    p.add_argument("--context", default=None, metavar="T",
                   help="context length in tokens for FLOPs and state bytes (default: each "
                        "run's data.seq_len)")
    p.add_argument("--best-over", default="train.lr", metavar="KEY",
                   help="keep the best run of each group differing only in KEY, e.g. train.lr "
                        "or lr (default: train.lr); 'none' keeps every run")
    p.add_argument("--json", action="store_true",
                   help="print the rows as JSON instead of the Markdown table")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    return p


def main(args: argparse.Namespace) -> int:
    """Run ``hycomp compare`` with parsed ``args``; 0, or the error's exit code (2)."""
    try:
        return _compare(args)
    except HycompError as e:
        print(e.render(), file=sys.stderr)
        return e.exit_code


def _context(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        T = int(text)
    except ValueError:
        T = 0
    if T < 1:
        raise HycompError(what=f"bad context length {text!r}", where=f"--context {text}",
                          why="FLOPs and state bytes are per token at a context of T >= 1 "
                              "tokens",
                          fix="give --context a positive whole number of tokens, e.g. "
                              "--context 2048 (default: each run's data.seq_len)")
    return T


def _out_folder(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        hit = next((p for p in [path, *path.parents] if p.exists()), path)
        raise HycompError(what=f"cannot use {out!r} as the output folder", where=f"-o {out}",
                          why=(f"{str(hit)!r} exists and is not a folder" if not hit.is_dir()
                               else e.strerror or str(e)),
                          fix="give -o a folder (new or existing), e.g. -o compare") from None
    return path


def _compare(args: argparse.Namespace) -> int:
    from composer.run.compare import collect, compare
    from composer.run.compare_table import markdown, write
    from composer.run.guards import json_safe
    context = _context(args.context)
    best_over = None if args.best_over.strip().lower() in ("none", "") else args.best_over
    notes: list[str] = []
    records = collect(args.paths, notes)
    out = _out_folder(args.out)
    cmp = compare(records, context=context, best_over=best_over, notes=notes)
    written = []
    if not args.no_plots:
        from composer.run.compare_plots import plot_all
        written, more = plot_all(cmp, records, out)
        notes += more
    written = write(cmp, out, extra={"paths": list(args.paths)}) + written
    for line in notes:
        print(line, file=sys.stderr)
    if args.json:
        print(json.dumps(json_safe(cmp.rows), indent=1, allow_nan=False))
    else:
        print(markdown(cmp.rows, cmp.columns))
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0
