"""``hycomp eval RUN [--task NAME ...] [--seq-len N,...] [key=value ...] [--json]``."""
from __future__ import annotations

import argparse
import json

HELP = "score a trained run on its data or on synthetic tasks, at any length"

EPILOG = """examples:
  hycomp eval runs/2026-12-06/10-00-00                     # its own data: loss, bits/byte or accuracy
  hycomp eval RUN --seq-len 256,512,1024                   # length extrapolation
  hycomp eval RUN --task mqar num_pairs=16 --seq-len 512   # a task, its settings changed
  hycomp eval RUN --task mqar --task in_context_recall --json

RUN is a run folder (its newest checkpoint) or one checkpoint folder. Without --task the run is
scored on its own data: text runs on --batches fixed validation windows (loss in nats per byte
and bits per byte), task runs on their whole test set (loss per scored token and accuracy).
A task the run did not train on uses its default settings (docs/tasks.md), changed by
key=value (data. prefix optional). Results print as a table and go to RUN/eval.json (results
of other items already there are kept)."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help=HELP, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run folder or one of its checkpoint folders")
    p.add_argument("--task", action="append", metavar="NAME",
                   help="text, mqar, in_context_recall, ... (repeat or comma-separate; "
                        "default: the run's own data)")
    p.add_argument("--seq-len", metavar="N[,N...]",
                   help="lengths to score at (default: each item's own data.seq_len)")
    p.add_argument("--batches", type=int, default=None, metavar="N",
                   help="validation batches for text (default: the run's train.eval_batches)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="sequences per forward pass (default: the run's train.batch_size)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--json", action="store_true", help="print eval.json's content")
    p.add_argument("--no-write", action="store_true", help="do not write RUN/eval.json")
    p.add_argument("settings", nargs="*", metavar="key=value",
                   help="task settings, e.g. num_pairs=16 vocab_size=256")
    return p


def _ints(text: str | None, flag: str) -> list[int] | None:
    from composer.core.errors import HycompError
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HycompError(what=f"bad {flag} {text!r}", where=f"{flag} {text}",
                          why="lengths are whole numbers of tokens",
                          fix=f"write e.g. {flag} 256,512,1024") from None


def _positive(value: int | None, flag: str) -> None:
    from composer.core.errors import HycompError
    if value is not None and value < 1:
        raise HycompError(what=f"bad {flag} {value}", where=f"{flag} {value}",
                          why="it counts batches or sequences: at least 1",
                          fix=f"give {flag} 1 or more, or leave it out")


def main(args) -> int:
    from composer.run.evaluate import evaluate_run, format_table, parse_settings
    tasks = [t for group in args.task or [] for t in group.split(",") if t] or None
    _positive(args.batches, "--batches")
    _positive(args.batch_size, "--batch-size")
    out = evaluate_run(args.run, tasks=tasks, seq_lens=_ints(args.seq_len, "--seq-len"),
                       settings=parse_settings(args.settings), batches=args.batches,
                       batch_size=args.batch_size, device=args.device, progress=True,
                       write=not args.no_write)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"checkpoint {out['checkpoint']} (step {out['step']})")
        print(format_table(out))
    return 0
