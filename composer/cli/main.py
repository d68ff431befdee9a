"""The ``hycomp`` command: ``hycomp <command> [options] [key=value overrides ...]``.

Overrides are Hydra's (``model.n_layers=12``, ``model=jamba_tiny``, ``+new.key=1``); they follow
the command. ``train`` is a Hydra app (``-m`` sweeps, run folders, ``--cfg job``); every other
command composes the same recipe tree with Hydra's compose API. Bad input of any kind prints
what / where / why / fix without a traceback and exits 2.
"""
from __future__ import annotations

import argparse
import itertools
import json
import signal
import sys
from pathlib import Path

from composer.core.errors import HycompError

COMMANDS = {
    "train": "train a recipe on CPU or GPU (Hydra app: -m sweeps, run folders)",
    "check": "validate a recipe; print the expanded schedule, parameters, FLOPs, cache",
    "viz": "draw the layer graph: SVG, PNG, Mermaid, DOT, and a terminal table",
    "schema": "print the JSON schema of recipes (or of one block type)",
    "kernels": "list ops x backends and what runs on this machine",
    "generate": "continue a prompt with a trained model (a run or checkpoint folder)",
    "eval": "score a trained run on its data or on synthetic tasks, at any length",
    "compare": "one table and plots across runs or sweeps: quality against cost",
}

EPILOG = """examples:
  hycomp train                                         # default 3:1 Mamba-2 : attention hybrid
  hycomp train model.schedule.ratio=5:1 model.n_layers=12 train.steps=200
  hycomp train -m model.schedule.ratio=1:1,3:1,7:1     # Hydra multirun sweep
  hycomp check model.schedule.pattern="M-M-M*-" --json
  hycomp viz model=gemma3_tiny
  hycomp check -r my_recipe.yaml model.d_model=256
  hycomp generate runs/2026-12-05/10-00-00 --prompt "def fibonacci("
  hycomp train -m data=mqar model.schedule.pattern=MMMM,MMM* train.lr=1e-3,3e-3
  hycomp eval RUN --task mqar --seq-len 256,512
  hycomp compare runs/multirun/2026-12-06/10-00-00

run 'hycomp <command> --help' for the options of a command."""


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "--recipe", default="config", metavar="NAME|FILE",
                   help="root config name, model recipe name (see recipes/model), or a YAML "
                        "file (default: config)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="Hydra overrides, e.g. model.n_layers=12 model=jamba_tiny")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hycomp", description="Hybrid Composer: compose, check, "
                                 "draw and train hybrid efficient language models.",
                                 epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from composer import __version__
    ap.add_argument("--version", action="version", version=f"hycomp {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="command")
    sub.add_parser("train", help=COMMANDS["train"], add_help=False)
    c = sub.add_parser("check", help=COMMANDS["check"], description=COMMANDS["check"])
    _recipe_args(c)
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("-T", "--seq-len", type=int, default=None,
                   help="context length for FLOPs and the generation cache (default: "
                        "data.seq_len)")
    v = sub.add_parser("viz", help=COMMANDS["viz"], description=COMMANDS["viz"])
    _recipe_args(v)
    v.add_argument("-o", "--out", default="viz", help="output folder (default: ./viz)")
    v.add_argument("-T", "--seq-len", type=int, default=None,
                   help="context length for FLOPs and state (default: data.seq_len)")
    v.add_argument("--engine", choices=["auto", "dot", "builtin"], default="auto",
                   help="auto: graphviz dot when installed, else the built-in renderer")
    v.add_argument("--formats", default="svg,png,mmd,dot",
                   help="comma-separated: svg,png,mmd,dot (default: all)")
    s = sub.add_parser("schema", help=COMMANDS["schema"], description=COMMANDS["schema"])
    s.add_argument("--block", default=None, help="print only this block type's spec schema")
    sub.add_parser("kernels", help=COMMANDS["kernels"], description=COMMANDS["kernels"])
    _generate_args(sub)
    from composer.cli import compare, evaluate
    evaluate.add_parser(sub)
    compare.add_parser(sub)
    return ap


GENERATE_EPILOG = """examples:
  hycomp generate runs/2026-12-05/10-00-00 --prompt "def fibonacci(" --max-new-tokens 200
  hycomp generate RUN --prompt-file prompts.txt --batch-size 8 --temperature 0.8 --seed 0
  echo "import os" | hycomp generate RUN --prompt - --greedy
  hycomp generate RUN/checkpoints/step_000200 --prompt "class " --json

Tokens are bytes: a prompt is its UTF-8 bytes, the new bytes are decoded as UTF-8 (a
multi-byte character appears when its last byte is made). One prompt streams: the prompt,
then each new piece of text as it is made. Several prompts (a file) print each prompt and its
new text under a '=== i/n ===' line when their batch ends. --json prints one object per
prompt per line: prompt, prompt_tokens, tokens (new token ids), text, new_tokens, prefill_ms,
ms_per_token (median decode step of the batch) and cache_bytes (per sequence).

Sampling by default: temperature 0.8, then the 50 most likely bytes, then the smallest set
holding 95% of the probability (Hugging Face's order); --greedy (or --temperature 0) takes
the most likely byte instead. Without --seed every run draws differently."""


def _generate_args(sub) -> None:
    g = sub.add_parser("generate", help=COMMANDS["generate"], description=COMMANDS["generate"],
                       epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("run", metavar="RUN", help="a run folder of 'hycomp train' (its newest "
                   "checkpoint) or one checkpoint folder (RUN/checkpoints/step_NNNNNN)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT",
                     help="the prompt; '-' reads it from standard input (all of it, newlines "
                          "included)")
    src.add_argument("--prompt-file", metavar="FILE",
                     help="a UTF-8 text file, one prompt per line (empty lines skipped)")
    g.add_argument("-n", "--max-new-tokens", type=int, default=200, metavar="N",
                   help="bytes to generate per prompt (default: 200)")
    g.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="prompts generated together (default: 8)")
    g.add_argument("--greedy", action="store_true",
                   help="take the most likely byte every time (no sampling)")
    g.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="divide the logits by T before sampling; lower is more predictable, "
                        "0 is greedy (default: 0.8)")
    g.add_argument("--top-k", type=int, default=50, metavar="K",
                   help="sample from the K most likely bytes; 0 keeps all (default: 50)")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P",
                   help="sample from the most likely bytes holding probability P, in (0, 1]; "
                        "1 keeps all (default: 0.95)")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed the sampling: the same seed gives the same text")
    g.add_argument("--json", action="store_true",
                   help="one JSON object per prompt per line, with tokens and timings")
    g.add_argument("--prefill-chunk-size", type=int, default=None, metavar="N",
                   help="feed long prompts in chunks of N tokens, bounding their memory "
                        "(default: 2048)")
    g.add_argument("--device", default="auto",
                   help="auto (cuda when there is one, else cpu), cpu, cuda or cuda:N")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(signal, "SIGPIPE"):  # `hycomp check | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        from composer.core.registry import did_you_mean
        _fail(HycompError(what=f"unknown command '{argv[0]}'",
                          why=f"commands: {', '.join(COMMANDS)}",
                          fix="run 'hycomp --help'" + did_you_mean(argv[0], COMMANDS)))
    if argv and argv[0] == "train":
        return _train(argv[1:])
    args, extra = _parser().parse_known_args(argv)
    if extra:
        if args.command == "eval" and not any(e.startswith("-") for e in extra):
            # key=value settings after an option: argparse has already filled the positionals
            args.settings += extra
        else:
            _parser().parse_args(argv)      # argparse's own message and exit 2
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        from composer.cli import compare, evaluate
        return {"check": _check, "viz": _viz, "schema": _schema, "kernels": _kernels,
                "generate": _generate, "eval": evaluate.main,
                "compare": compare.main}[args.command](args)
    except HycompError as e:
        _fail(e)
    return 0


def _fail(e: HycompError) -> None:
    print(e.render(), file=sys.stderr)
    sys.exit(e.exit_code)


# --------------------------------------------------------------------------------------------
def _check(args) -> int:
    import composer
    from composer.build.costs import totals
    from composer.cli.prepare import context_length, load_runnable, notes
    from composer.viz.labels import human_bytes
    recipe = load_runnable(args.recipe, args.overrides)
    T = context_length(args.seq_len, recipe)
    g = composer.layer_graph(recipe)
    report = check_report(recipe, g, T)
    for line in notes(args.recipe, args.overrides, recipe):
        print(line, file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"pattern   {_cut(report['pattern'])}   ({report['counting']} counting, "
          f"{report['n_sublayers']} sub-layers)")
    rows = [("#", "layer", "node", "block", "params", f"cache@T={T}", "settings")]
    subs = report["sublayers"]
    shown = subs if len(subs) <= MAX_ROWS else subs[:MAX_ROWS - 10] + [None] + subs[-10:]
    for s in shown:
        if s is None:
            rows.append(("...", "", "", "", "", "", f"{len(subs) - MAX_ROWS:,} sub-layers "
                         "not shown (--json lists every one)"))
            continue
        name = s["name"] if s["name"] == s["kind"] else f"{s['name']} ({s['kind']})"
        extra = "shared with " + s["shares"] if s.get("shares") else _fields_brief(s)
        rows.append((str(s["index"]), str(s["layer"]), s["node"], name, f"{s['params']:,}",
                     human_bytes(s["state_bytes"]) if s["state_bytes"] else "-", extra))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    right = {4, 5}
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        print(("  ".join(cells) + "  " + r[6]).rstrip())
    t = totals(g, T)
    print(f"\nparameters        {t['params']:,}")
    print(f"FLOPs/token       {t['flops_per_token']:,.0f}  (forward, context T={T})")
    # states of the recurrent blocks + KV caches: what generation holds per sequence
    print(f"generation cache  {human_bytes(t['state_bytes'])} per sequence "
          f"({t['state_bytes']:,} bytes; fp32, at T={T})")
    return 0


MAX_ROWS = 64
"""Sub-layers the check table lists; a deeper model shows its first and last ones."""


def _cut(pattern: str, width: int = 512) -> str:
    return pattern if len(pattern) <= width else (
        f"{pattern[:width]}... ({len(pattern):,} symbols; --json has all)")


def _fields_brief(s: dict) -> str:
    """The settings that differ from the block type's defaults (all of them: --json)."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
                    for k, v in s["settings"].items())


def _settings(spec) -> dict:
    """Fields of ``spec`` that differ from its type's defaults (JSON values)."""
    dumped = spec.model_dump(mode="json")
    out = {}
    for k, f in type(spec).model_fields.items():
        if k == "kind":
            continue
        if f.is_required() or getattr(spec, k) != f.get_default(call_default_factory=True):
            out[k] = dumped[k]
    return out


def check_report(recipe, g, T: int) -> dict:
    """What ``hycomp check --json`` prints: expanded sub-layers, pattern, parameters, FLOPs,
    generation cache. ``fields`` holds every field of a sub-layer's spec, ``settings`` those
    that differ from the block type's defaults; ``state_bytes`` (per sub-layer and in all) is
    the generation cache of one sequence at context T in fp32: recurrent states, KV caches."""
    from composer.build.costs import totals
    dumps: dict[int, tuple] = {}  # one dump per spec object: deep models repeat a few specs

    def fields(spec):
        if id(spec) not in dumps:
            dumps[id(spec)] = (spec, spec.model_dump(mode="json"), _settings(spec))
        return dumps[id(spec)][1:]

    subs = []
    for nid, a in g.nodes(data=True):
        if a["op"] not in ("residual", "combine"):
            continue
        full, settings = fields(a["spec"])
        item = {"index": a["index"], "layer": a["layer"], "node": nid, "name": a["name"],
                "kind": a["kind"], "role": a["role"], "module_key": a["module_key"],
                "params": a["params"], "flops_per_token": a["flops"](T),
                "state_bytes": a["state_bytes"](T), "fields": dict(full),
                "settings": dict(settings)}
        if a.get("shares"):
            item["shares"] = a["shares"]
        if a["op"] == "combine":
            item["branches"] = []
            for b in sorted(p for p in g.predecessors(nid) if g.nodes[p]["op"] == "branch"):
                ba = g.nodes[b]
                bfull, bset = fields(ba["spec"])
                item["branches"].append({"node": b, "name": ba["name"], "kind": ba["kind"],
                                         "params": ba["params"], "fields": dict(bfull),
                                         "settings": dict(bset)})
                item["params"] += ba["params"]
                item["flops_per_token"] += ba["flops"](T)
                item["state_bytes"] += ba["state_bytes"](T)
        subs.append(item)
    t = totals(g, T)
    return {"pattern": g.graph["pattern"], "counting": g.graph["counting"],
            "n_sublayers": len(subs), "T": T, "params": t["params"],
            "params_embedding": g.nodes["embed"]["params"],
            "params_final_norm": g.nodes["norm"]["params"],
            "params_head": g.nodes["head"]["params"],
            "flops_per_token": t["flops_per_token"], "state_bytes": t["state_bytes"],
            "sublayers": subs}


def _viz(args) -> int:
    import composer
    from composer import viz
    from composer.cli.prepare import context_length, load_runnable, notes
    recipe = load_runnable(args.recipe, args.overrides)
    T = context_length(args.seq_len, recipe)
    g = composer.layer_graph(recipe)
    for line in notes(args.recipe, args.overrides, recipe):
        print(line, file=sys.stderr)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    bad = [f for f in formats if f not in ("svg", "png", "mmd", "dot")]
    if bad:
        raise HycompError(what=f"unknown format {bad[0]!r}", where="--formats",
                          why="formats are svg, png, mmd, dot", fix="e.g. --formats svg,png")
    from composer.viz.draw import out_folder
    out = out_folder(args.out)  # before the table: fail first
    print(viz.table(g, T, max_rows=MAX_ROWS))
    paths = viz.draw(g, out, T, formats=formats, engine=args.engine)
    for kind, path in paths.items():
        print(f"wrote {kind:4s} {path}")
    return 0


def _generate(args) -> int:
    from composer.run import generate as gen
    gen.check_counts(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     prefill_chunk_size=args.prefill_chunk_size)
    sampling = gen.sampling_from(args.greedy, args.temperature, args.top_k, args.top_p)
    device = gen.device_from(args.device)
    ckpt = gen.find_checkpoint(args.run)
    if args.prompt_file is not None:
        prompts = gen.prompts_from_file(args.prompt_file)
    elif args.prompt == "-":
        prompts = [gen.prompt_from_stdin(sys.stdin.buffer.read() if sys.stdin else b"")]
    elif args.prompt is not None:
        prompts = [gen.prompt_from_argument(args.prompt)]
    else:
        raise HycompError(what="no prompt", where="hycomp generate",
                          why="generation continues a prompt",
                          fix="give --prompt TEXT, --prompt - (standard input) or "
                              "--prompt-file FILE")
    model, _ = gen.load_model(ckpt, device)
    gen.check_prompts(model, prompts, args.max_new_tokens)
    print(f"checkpoint {ckpt}: {model.num_params():,} parameters on {device}",
          file=sys.stderr)
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character
        sys.stdout.reconfigure(errors="replace")
    try:
        gen.write_generations(sys.stdout, model, prompts, args.max_new_tokens, sampling,
                              args.batch_size, gen.make_generator(args.seed, device),
                              args.prefill_chunk_size, as_json=args.json)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


def _schema(args) -> int:
    from composer.recipe.schema import Recipe
    from composer.core.registry import block_types, get_block
    if args.block:
        print(json.dumps(get_block(args.block).spec.model_json_schema(), indent=2))
        return 0
    schema = Recipe.model_json_schema()
    schema["x-blocks"] = {n: bt.spec.model_json_schema() for n, bt in block_types().items()}
    print(json.dumps(schema, indent=2))
    return 0


def _kernels(args) -> int:
    import torch
    from composer.core.registry import op_doc, ops, resolve_backend
    rows = [("op", "backend", "code", "priority", "devices", "shapes", "available here",
             "auto on cpu/fp32")]
    for op_name, backends in ops().items():
        # the pick for any call; a shape-restricted backend above it wins the calls it takes
        auto = resolve_backend(op_name, "auto", torch.device("cpu"), torch.float32)
        marked = set()   # shape declarations already won by a higher-priority backend
        for b in sorted(backends.values(), key=lambda b: -b.priority):
            miss = b.available()
            if b.name == auto.name:
                mark = "<- auto"
            elif (b.accepts is not None and b.priority > auto.priority and miss is None
                  and b.fits(torch.device("cpu"), torch.float32) and b.shapes not in marked):
                mark = "<- auto for these shapes"
                marked.add(b.shapes)
            else:
                mark = ""
            rows.append((op_name, b.name, "pytorch" if b.pure else "compiled", str(b.priority),
                         ",".join(sorted(b.devices)),
                         b.shapes, "yes" if miss is None else f"no: {miss}", mark))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print()
    for op_name in ops():
        print(f"{op_name}: {op_doc(op_name)}")
    return 0


# --------------------------------------------------------------------------------------------
# train: validate every job of the command first, then hand the command line to Hydra
# --------------------------------------------------------------------------------------------
TRAIN_HELP = """usage: hycomp train [-r NAME|FILE] [-m] [hydra options] [key=value ...]

Train a recipe. Overrides follow the command: model.n_layers=12 train.steps=200.
  -r, --recipe NAME|FILE  model recipe name (recipes/model) or a YAML file
  -m, --multirun          sweep: model.schedule.ratio=1:1,3:1,7:1 runs three jobs
  train.resume=DIR        continue a run folder from its last checkpoint
  data=mqar               train on a synthetic task instead of text (docs/tasks.md)
  train.logger=tensorboard  also log to TensorBoard (or wandb, offline) in the run folder
  --cfg job               print the composed recipe and exit
Runs go to runs/<date>/<time>/ (sweeps: runs/multirun/<date>/<time>/<n>_<key>-<value>...):
metrics.jsonl, checkpoints/, loss.png, summary.json, .hydra/ (the composed config).
Every job of a sweep is validated before the first one starts."""

MAX_PREFLIGHT = 256


def _train(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(TRAIN_HELP)
        return 0
    argv, recipe = _take_recipe(argv)
    hydra_flags, overrides = _split_hydra_flags(argv)
    try:
        _preflight(recipe, overrides)
        from composer.recipe.compose import full_overrides
        overrides = full_overrides(recipe, overrides)
        if recipe != "config":
            overrides, hydra_flags = _recipe_to_hydra(recipe, overrides, hydra_flags)
        overrides += _resume_into_run_folder(overrides)
        from composer.run.app import check_run_dirs
        multirun = bool({"-m", "--multirun"} & set(hydra_flags))
        check_run_dirs(overrides, multirun=multirun)
        if multirun:
            overrides += _name_jobs_by_sweep(overrides)
    except HycompError as e:
        _fail(e)
    from composer.run.app import hydra_train
    sys.argv = ["hycomp train", *hydra_flags, *overrides]
    hydra_train()
    return 0


def _resume_into_run_folder(overrides: list[str]) -> list[str]:
    """With train.resume=DIR (and no hydra.run.dir), Hydra's record of the resumed job goes
    into DIR/.hydra/resumed-<time> instead of a new, otherwise empty run folder."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    resume = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "train.resume"]
    if not resume or resume[-1] in ("null", ""):
        return []
    from composer.run.checkpoint import latest_checkpoint
    latest_checkpoint(Path(resume[-1]))  # a run folder with a checkpoint, before Hydra's mkdir
    if "hydra.run.dir" in keys:
        return []
    return [f"hydra.run.dir={resume[-1]}",
            "hydra.output_subdir=.hydra/resumed-${now:%Y-%m-%d_%H-%M-%S}"]


def _name_jobs_by_sweep(overrides: list[str]) -> list[str]:
    """Hydra's ``override_dirname`` (job folder names, run labels) limited to the swept keys:
    every other key of the command line goes to its ``exclude_keys``."""
    from composer.recipe.compose import parse_overrides
    keys = [o.split("=", 1)[0] for o in overrides]
    if any(k.lstrip("+~").startswith("hydra.job.config.override_dirname") for k in keys):
        return []
    fixed = sorted({o.key_or_group for o in parse_overrides(overrides)
                    if not o.is_sweep_override() and not o.key_or_group.startswith("hydra.")})
    return [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(fixed)}]"]


def _take_recipe(argv: list[str]) -> tuple[list[str], str]:
    out, recipe, it = [], "config", iter(argv)
    for a in it:
        if a in ("-r", "--recipe"):
            recipe = next(it, None) or _fail(HycompError("-r needs a value",
                                                         fix="-r NAME or -r FILE.yaml"))
        elif a.startswith("--recipe="):
            recipe = a.split("=", 1)[1]
        else:
            out.append(a)
    return out, recipe


_HYDRA_VALUED = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                 "-cn", "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


def _split_hydra_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    flags, overrides, it = [], [], iter(argv)
    for a in it:
        if a.startswith("-"):
            flags.append(a)
            if a in _HYDRA_VALUED:
                nxt = next(it, None)
                if nxt is not None:
                    flags.append(nxt)
        else:
            overrides.append(a)
    return flags, overrides


def _recipe_to_hydra(recipe: str, overrides, flags):
    from composer.recipe.compose import _source
    kind, where, name, extra = _source(recipe)
    if kind == "dir":
        return ([*extra, *overrides], [*flags, "--config-dir", where, "--config-name", name])
    return [*extra, *overrides], flags


def _preflight(recipe: str, overrides: list[str]) -> None:
    """Validate every job a (multi)run would start; raise on the first bad one."""
    from composer.cli.prepare import check_runnable, notes
    from composer.recipe.compose import compose_dict, parse_overrides
    from composer.recipe.validate import validate_recipe
    parsed = parse_overrides(overrides)
    axes = []
    for o in parsed:
        if o.is_sweep_override():
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    jobs = list(itertools.islice(itertools.product(*axes), MAX_PREFLIGHT))
    probed: set = set()
    for k, job in enumerate(jobs):
        try:
            r = validate_recipe(compose_dict(recipe, list(job)))
            check_runnable(r, probed)
            if k == 0:
                for line in notes(recipe, list(job), r):
                    print(line, file=sys.stderr)
        except HycompError as e:
            if len(jobs) > 1:
                e.what = f"{e.what}  [sweep job: {' '.join(job)}]"
            raise


if __name__ == "__main__":
    sys.exit(main())
