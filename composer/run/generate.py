"""Generation from a trained run: the model a checkpoint holds, prompts, text as it arrives.

The vocabulary is bytes (256 tokens, :mod:`composer.run.data`): a prompt is its UTF-8 bytes,
and new tokens are bytes decoded as UTF-8 as they come, an incomplete multi-byte sequence held
back until its last byte arrives (:class:`Utf8Stream`). ``hycomp generate`` is this module plus
argument parsing (:mod:`composer.cli.main`); the trainer's closing sample
(:func:`training_sample`) uses it too. Caches, prefill, decode and sampling are
:mod:`composer.build.generation`.

Every bad input raises a :class:`~composer.core.errors.HycompError` (what / where / why / fix):
a missing or damaged checkpoint (:class:`~composer.core.errors.CheckpointError`), an empty
prompt, a prompt file that is not UTF-8 text, a prompt plus ``max_new_tokens`` past the
model's positions, out-of-range sampling settings or sizes.
"""
from __future__ import annotations

import codecs
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

import torch

from composer.build.generation import Generation, Sampling, position_limit
from composer.core.errors import CheckpointError, HycompError, RecipeError
from composer.run.checkpoint import CKPT_DIR, latest_checkpoint, load_checkpoint, read_recipe
from composer.run.runtime import pick_device

_FIX_CKPT = ("give a run folder written by `hycomp train` (runs/<date>/<time>) or one of its "
             "checkpoints/step_* folders; no run yet: `hycomp train` makes one")
_FIX_DAMAGED = ("give an earlier checkpoint of the run (RUN/checkpoints/step_*), or train "
                "again: `hycomp train`")
NOT_BYTE = 0xFF
"""Stands in for a token outside 0..255 (a vocabulary larger than bytes): never valid UTF-8,
so it decodes to one U+FFFD."""


# --------------------------------------------------------------------------------------------
# The model of a run or checkpoint folder
# --------------------------------------------------------------------------------------------
def find_checkpoint(path) -> Path:
    """The checkpoint folder ``path`` names: ``path`` itself when it is a checkpoint folder
    (it holds ``recipe.json``), else the newest complete checkpoint of the run folder
    ``path`` (its ``checkpoints/latest``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(what=f"run or checkpoint folder not found: {p}", where=str(p),
                              why="there is no file or folder there", fix=_FIX_CKPT)
    if not p.is_dir():
        raise CheckpointError(what=f"{p} is a file, not a run or checkpoint folder",
                              where=str(p), why="a model is read from a checkpoint folder "
                                                "(model.safetensors, recipe.json, ...)",
                              fix=f"give the folder the file is in ({p.parent}) if it is a "
                                  "checkpoint, or " + _FIX_CKPT)
    if (p / "recipe.json").exists() or (p / "model.safetensors").exists():
        return p
    if p.name == CKPT_DIR and not (p / CKPT_DIR).exists():
        p = p.parent                    # RUN/checkpoints names the run
    ckpts = p / CKPT_DIR
    if (ckpts / "latest").is_file() or any(q.is_dir() for q in ckpts.glob("step_*")):
        try:
            return latest_checkpoint(p)
        except CheckpointError as e:
            raise CheckpointError(what=e.what, where=e.where, why=e.why,
                                  fix=_FIX_DAMAGED) from None
    ran = (p / "summary.json").exists() or (p / "metrics.jsonl").exists()
    raise CheckpointError(
        what=f"no checkpoint in {p}", where=str(p),
        why=("the run wrote no checkpoint (it stopped before its first one)" if ran else
             "it is neither a checkpoint folder (no recipe.json) nor a run folder (no "
             "checkpoints/step_* inside)"),
        fix=_FIX_CKPT)


def load_model(path, device=None) -> tuple[torch.nn.Module, object]:
    """``(model, recipe)`` of a run folder (its newest checkpoint) or a checkpoint folder: the
    recipe is the checkpoint's ``recipe.json``, the weights its ``model.safetensors`` (checked
    against the sha256 the checkpoint recorded). The model is in eval mode on ``device``
    (default cpu; ``"auto"``: cuda when there is one)."""
    import composer
    ckpt = find_checkpoint(path)
    try:
        recipe = composer.validate_recipe(read_recipe(ckpt))
    except RecipeError as e:
        raise CheckpointError(what="the checkpoint's recipe is not valid here",
                              where=str(ckpt / "recipe.json"),
                              why="it was written by another version of hycomp, or changed",
                              fix=_FIX_DAMAGED, problems=[e]) from None
    except CheckpointError as e:
        raise CheckpointError(what=e.what, where=e.where, why=e.why, fix=_FIX_DAMAGED) from None
    model = composer.build_model(recipe, pick_device(device or "cpu"))
    try:
        load_checkpoint(ckpt, model)
    except CheckpointError as e:
        raise CheckpointError(what=e.what, where=e.where, why=e.why, fix=_FIX_DAMAGED) from None
    return model.eval(), recipe


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """One prompt: its text and where it came from (for messages)."""

    text: str
    where: str

    @property
    def tokens(self) -> list[int]:
        return list(self.text.encode("utf-8"))


def _not_text(where: str, why: str, fix: str) -> HycompError:
    return HycompError(what="the prompt is not UTF-8 text", where=where, why=why, fix=fix)


def _decode(raw: bytes, where: str, fix: str) -> str:
    """``raw`` as UTF-8 text without NUL; else an error naming the line and byte."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise _not_text(f"{where}:{line}", f"byte {e.start} ({raw[e.start:e.start + 1]!r}) is "
                        "not UTF-8: the file looks binary", fix) from None
    nul = text.find("\x00")
    if nul >= 0:
        raise _not_text(f"{where}:{text.count(chr(10), 0, nul) + 1}",
                        f"it holds a NUL character (at character {nul}): the file looks "
                        "binary", fix)
    return text


def _empty(where: str, why: str) -> HycompError:
    return HycompError(what="empty prompt", where=where, why=why,
                       fix="give some text to continue, e.g. --prompt 'def fibonacci('")


def prompt_from_argument(text: str) -> Prompt:
    """``--prompt TEXT``."""
    where = "--prompt"
    if not text:
        raise _empty(where, "generation continues a prompt of at least one byte")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:   # argv bytes that were not UTF-8 (surrogate escapes)
        raise _not_text(where, f"character {e.start} is not valid UTF-8",
                        "pass UTF-8 text, or put the prompt in a file: --prompt-file") from None
    return Prompt(text, where)


def prompt_from_stdin(raw: bytes) -> Prompt:
    """``--prompt -``: all of standard input is one prompt (newlines included)."""
    where = "--prompt - (standard input)"
    text = _decode(raw, where, "pipe UTF-8 text into hycomp generate")
    if not text:
        raise _empty(where, "standard input was empty")
    return Prompt(text, where)


def prompts_from_file(path) -> list[Prompt]:
    """``--prompt-file FILE``: one prompt per line (a trailing ``\\r`` is dropped); empty lines
    are skipped."""
    p = Path(path)
    flag = f"--prompt-file {p}"
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise HycompError(what=f"cannot read the prompt file {p}", where=flag,
                          why=e.strerror or str(e),
                          fix="give a text file with one prompt per line") from None
    text = _decode(raw, str(p), "give a UTF-8 text file with one prompt per line")
    out = [Prompt(line.removesuffix("\r"), f"{p}:{i}")
           for i, line in enumerate(text.split("\n"), 1) if line.removesuffix("\r")]
    if not out:
        raise _empty(flag, "the file holds no prompt (every line is empty)")
    return out


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
def sampling_from(greedy: bool, temperature: float, top_k: int, top_p: float) -> Sampling:
    """The :class:`Sampling` of the command line's settings, or an error for each one out of
    range (checked with ``greedy`` too: a bad value is a mistake either way)."""
    s = Sampling(do_sample=not greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    bad = [HycompError(what=f"bad --{name.replace('_', '-')} {value}",
                       where=f"--{name.replace('_', '-')} {value}", why=why, fix=fix)
           for name, value, why, fix in s.problems()]
    if len(bad) == 1:
        raise bad[0]
    if bad:
        raise HycompError(what=f"{len(bad)} bad sampling settings", problems=bad)
    return s


_COUNT_EXAMPLE = {"max_new_tokens": 200, "batch_size": 8, "prefill_chunk_size": 2048}


def check_counts(**counts: int | None) -> None:
    """Each named count (``max_new_tokens=200``) must be a whole number >= 1 (None: unset)."""
    for name, n in counts.items():
        if n is not None and n < 1:
            flag = f"--{name.replace('_', '-')}"
            raise HycompError(what=f"bad {flag} {n}", where=f"{flag} {n}",
                              why="it counts tokens or prompts: a whole number >= 1",
                              fix=f"e.g. {flag} {_COUNT_EXAMPLE.get(name, 1)}")


def check_prompts(model, prompts: list[Prompt], max_new_tokens: int) -> None:
    """Every prompt's bytes are in the model's vocabulary, and prompt plus ``max_new_tokens``
    fit the positions of a model with a growing KV cache (:func:`position_limit`)."""
    vocab = model.embed.num_embeddings
    limit = position_limit(model)
    for p in prompts:
        toks = p.tokens
        top = max(toks)
        if top >= vocab:
            raise HycompError(what="the prompt holds a byte the vocabulary does not have",
                              where=p.where, why=f"tokens are bytes; byte {top} is not below "
                                                 f"model.vocab_size={vocab}",
                              fix=f"use characters whose UTF-8 bytes are below {vocab} "
                                  "(ASCII fits a vocabulary of 128)")
        if limit is not None and len(toks) + max_new_tokens > limit:
            room = limit - len(toks)
            raise HycompError(
                what="prompt plus --max-new-tokens exceed the model's positions",
                where=p.where,
                why=f"the prompt is {len(toks)} tokens (bytes) and --max-new-tokens "
                    f"{max_new_tokens}: {len(toks) + max_new_tokens} > {limit}, the "
                    f"model.max_seq_len its global attention was trained for (its KV cache "
                    f"grows with the context)",
                fix=f"--max-new-tokens {room} or fewer" if room > 0 else
                    f"shorten the prompt to under {limit} bytes")


def device_from(name: str) -> torch.device:
    """``--device``: auto (cuda when there is one, else cpu) or a device that exists here."""
    try:
        return pick_device(name)
    except RecipeError as e:
        raise HycompError(what=e.what, where=f"--device {name}", why=e.why,
                          fix="use --device auto, cpu, cuda or cuda:N") from None


def make_generator(seed: int | None, device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``; None: a fresh nondeterministic seed
    (torch's default generator starts from the same seed in every process)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


# --------------------------------------------------------------------------------------------
# Text out
# --------------------------------------------------------------------------------------------
def as_bytes(tokens: Iterable[int]) -> bytes:
    """Byte tokens as bytes; a token outside 0..255 becomes :data:`NOT_BYTE`."""
    return bytes(t if 0 <= t < 256 else NOT_BYTE for t in tokens)


def decode(tokens: Iterable[int]) -> str:
    """Byte tokens as text (UTF-8, invalid sequences as U+FFFD): what :class:`Utf8Stream`
    writes in pieces."""
    return as_bytes(tokens).decode("utf-8", errors="replace")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""C0 and C1 control characters but newline and tab."""


def printable(text: str) -> str:
    """``text`` with control characters other than newline and tab written as escapes
    (``\\x1b``): a terminal shows them instead of obeying them."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class Utf8Stream:
    """Writes byte tokens to ``out`` as UTF-8 text as they arrive, flushing after each write.

    An incomplete multi-byte sequence is held back until its last byte arrives (an
    incremental decoder); invalid bytes become U+FFFD, as in :func:`decode`, so the pieces
    written add up to ``decode(all tokens)``. ``escape_controls``: :func:`printable` on what is
    written (for a terminal)."""

    def __init__(self, out: TextIO, escape_controls: bool = False):
        self.out = out
        self.escape = escape_controls
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def text(self, s: str) -> None:
        """Write text as it is (a prompt)."""
        self._put(s)

    def write(self, tokens: Iterable[int]) -> str:
        """Decode and write what is complete of ``tokens``; return the text written."""
        s = self._dec.decode(as_bytes(tokens))
        self._put(s)
        return s

    def close(self) -> str:
        """Write what is held back (as U+FFFD: the sequence never completed)."""
        s = self._dec.decode(b"", final=True)
        self._put(s)
        return s

    def _put(self, s: str) -> None:
        if s:
            self.out.write(printable(s) if self.escape else s)
            self.out.flush()


# --------------------------------------------------------------------------------------------
# Generation over batches of prompts
# --------------------------------------------------------------------------------------------
def generate_batches(model, prompts: list[Prompt], max_new_tokens: int, sampling: Sampling,
                     batch_size: int = 8, generator: torch.Generator | None = None,
                     prefill_chunk_size: int | None = None,
                     on_token: Callable[[int, int], None] | None = None) -> Iterator[dict]:
    """Generate for ``prompts`` in batches of ``batch_size`` (in order); yield one result per
    prompt when its batch ends. ``on_token(i, token)`` sees each new token of prompt ``i`` as
    it is made.

    A result: ``prompt``, ``prompt_tokens``, ``tokens`` (the new token ids), ``text`` (their
    :func:`decode`), ``new_tokens``, and the batch's ``prefill_ms``, ``ms_per_token`` (median
    decode step; None without one) and ``cache_bytes`` (per sequence)."""
    extra = {} if prefill_chunk_size is None else {"prefill_chunk_size": prefill_chunk_size}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        gen = Generation(model, [p.tokens for p in batch], max_new_tokens, sampling,
                         generator=generator, **extra)

        def step(toks, start=start):
            if on_token is not None:
                for b, t in enumerate(toks):
                    if t is not None:
                        on_token(start + b, t)

        gen.run(on_step=step)
        ms = statistics.median(gen.step_s) * 1e3 if gen.step_s else None
        per_seq = gen.cache.nbytes // len(batch) if gen.cache is not None else 0
        for p, toks in zip(batch, gen.new_tokens):
            yield {"prompt": p.text, "prompt_tokens": len(p.tokens), "tokens": toks,
                   "text": decode(toks), "new_tokens": len(toks),
                   "prefill_ms": gen.prefill_s * 1e3, "ms_per_token": ms,
                   "cache_bytes": per_seq}


def write_generations(out: TextIO, model, prompts: list[Prompt], max_new_tokens: int,
                      sampling: Sampling, batch_size: int = 8,
                      generator: torch.Generator | None = None,
                      prefill_chunk_size: int | None = None, as_json: bool = False) -> None:
    """What ``hycomp generate`` prints. ``as_json``: one JSON object per prompt per line
    (:func:`generate_batches`), each when its batch ends. Else one prompt: the prompt, then
    its new text as it is made; several: each prompt and its new text, under a ``=== i/n ===``
    line, when its batch ends. Text ends with a newline; on a terminal, control characters
    are shown as escapes."""
    tty = bool(getattr(out, "isatty", lambda: False)())
    stream = None
    if len(prompts) == 1 and not as_json:
        stream = Utf8Stream(out, escape_controls=tty)
        stream.text(prompts[0].text)
    results = generate_batches(model, prompts, max_new_tokens, sampling, batch_size,
                               generator, prefill_chunk_size,
                               on_token=(lambda _i, t: stream.write([t])) if stream else None)
    for i, r in enumerate(results):
        if as_json:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
        elif stream is not None:
            stream.close()
            out.write("\n")
        else:
            text = r["prompt"] + r["text"]
            out.write(f"=== {i + 1}/{len(prompts)} ===\n{printable(text) if tty else text}\n")
        out.flush()


# --------------------------------------------------------------------------------------------
# The sample at the end of a training run
# --------------------------------------------------------------------------------------------
SAMPLE_PROMPT_BYTES = 48
"""At most this many bytes of validation text start the trainer's closing sample."""


def sample_prompt(window: torch.Tensor) -> str:
    """The start of a validation window (uint8 or int64 bytes, (T,)): up to
    :data:`SAMPLE_PROMPT_BYTES` bytes, cut after its last newline when there is one past the
    first 8 bytes, and at a whole UTF-8 character."""
    raw = bytes(int(b) for b in window[:SAMPLE_PROMPT_BYTES])
    cut = raw.rfind(b"\n")
    if cut >= 8:
        raw = raw[:cut + 1]
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(raw)


def training_sample(model, window: torch.Tensor, max_new_tokens: int) -> tuple[str, str]:
    """``(prompt, continuation)``: the greedy continuation of :func:`sample_prompt`, at most
    ``max_new_tokens`` bytes and no further than the model's positions allow."""
    prompt = Prompt(sample_prompt(window), "validation text")
    n = max_new_tokens
    limit = position_limit(model)
    if limit is not None:
        n = min(n, limit - len(prompt.tokens))
    if not prompt.text or n < 1:
        return prompt.text, ""
    was_training = model.training
    model.eval()
    try:
        gen = Generation(model, [prompt.tokens], n, Sampling(do_sample=False)).run()
    finally:
        model.train(was_training)
    return prompt.text, decode(gen.new_tokens[0])
