"""Synthetic tasks as data sources: the settings of each task (``data=mqar`` and others).

Pure data, as :mod:`composer.recipe.schema`: one Pydantic model per task, every field
documented with the published value beside our default; :meth:`TaskData.problems` names the
setting combinations that cannot make a sequence. The generators are in
:mod:`composer.run.tasks`; ``docs/tasks.md`` shows each task's token layout.

Sources:

* ``mqar``: multi-query associative recall, Zoology (Arora et al. 2023, arXiv 2312.04927;
  HazyResearch/zoology, ``multiquery_ar``).
* ``in_context_recall``, ``noisy_in_context_recall``, ``fuzzy_in_context_recall``,
  ``selective_copying``, ``compression``, ``memorization``: MAD (Poli et al. 2024,
  arXiv 2403.17844; athms/mad-lab, ``mad/data/instances.py``), with the benchmark's baseline
  settings (``configs/tasks/*.yml``) as defaults where they suit a CPU.

Every task puts its special tokens (pad, blank, copy, insert, compression) at the top of
``vocab_size``, so the ids a task emits are exactly ``0 .. vocab_size - 1``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from composer.core.block import Spec

Problem = tuple[str, str, str, str]
"""(what, where, why, fix); where is the field name, e.g. ``num_pairs``."""


class TaskData(Spec):
    """Settings every synthetic task has. Subclasses narrow ``task`` and set the defaults."""

    task: str
    """Which task (a key of :data:`TASKS`)."""
    vocab_size: int
    """Token ids the task emits are < vocab_size."""
    seq_len: int
    """Tokens per sequence (the model's input length)."""
    train_size: int | None = Field(None, ge=1)
    """null: fresh training sequences drawn for every batch; N: a fixed set of N sequences,
    generated once (in memory), that batches draw from."""
    test_size: int = Field(1000, ge=1)
    """Sequences in the fixed test (validation) set."""
    seed: int = 0
    """Data seed: the test set, a fixed training set and memorization's facts depend only on
    the settings and this seed (training batches also on the trainer's generator)."""

    def problems(self) -> list[Problem]:
        """``(what, where, why, fix)`` for each setting combination that cannot produce a
        sequence; empty when the settings are fine."""
        return []

    def vocab_needed(self) -> int:
        """Smallest model vocabulary that holds every token id this task emits."""
        return self.vocab_size

    def with_seq_len(self, seq_len: int) -> TaskData:
        """A copy at another sequence length (length extrapolation), other settings equal."""
        return type(self).model_validate({**self.model_dump(), "seq_len": seq_len})

    def _even_seq_len(self, why: str) -> list[Problem]:
        if self.seq_len % 2 == 0:
            return []
        return [(f"data.seq_len={self.seq_len} is odd; {self.task} needs an even length",
                 "seq_len", why, f"set data.seq_len to {self.seq_len - 1} or {self.seq_len + 1}")]

    def _min_seq_len(self, least: int, why: str, fix_other: str = "") -> list[Problem]:
        if self.seq_len >= least:
            return []
        return [(f"data.seq_len={self.seq_len} is too short for {self.task}: it needs at "
                 f"least {least}", "seq_len", why,
                 f"raise data.seq_len to {least}" + (f" or {fix_other}" if fix_other else ""))]


# --------------------------------------------------------------------------------------------
# Zoology
# --------------------------------------------------------------------------------------------
class MQARData(TaskData):
    """Multi-query associative recall (Zoology). The sequence starts with ``num_pairs``
    key-value pairs ``k1 v1 k2 v2 ...`` (keys distinct, from ids 1 .. vocab_size/2 - 1; values
    distinct, from vocab_size/2 .. vocab_size - 1); each key is queried once later, at a
    power-law distributed gap; every other position holds a uniformly random token. Scored:
    the position of each query key (target: its value)."""

    task: Literal["mqar"] = "mqar"
    vocab_size: int = Field(256, ge=4)
    """Vocabulary (Zoology: 8192; 256 here so byte-level models train it)."""
    seq_len: int = Field(128, ge=4)
    """Tokens per sequence, even (Zoology: 64 by default, 64-512 in the paper's Figure 2)."""
    num_pairs: int = Field(8, ge=1)
    """Key-value pairs, each queried once (Zoology's num_kv_pairs: 4 by default, 4-64 in the
    paper's Figure 2)."""
    power: float = Field(0.01, gt=0)
    """Power-law exponent a of the query gaps, p(gap) ∝ a·gap^(a-1) (Zoology's power_a,
    0.01; 1 gives uniform gaps)."""
    train_size: int | None = Field(None, ge=1)
    """null: fresh sequences every batch (Zoology: a fixed set of 100,000); N: a fixed set of
    N sequences."""

    def problems(self) -> list[Problem]:
        out = self._even_seq_len("the sequence is 2-token key-value pairs, then 2-token query "
                                 "slots (Zoology asserts an even input_seq_len)")
        need = 4 * self.num_pairs
        if self.seq_len < need:
            most = self.seq_len // 4
            out.append((
                f"data.num_pairs={self.num_pairs} needs data.seq_len >= {need}; "
                f"data.seq_len={self.seq_len}", "num_pairs",
                "each pair takes 4 tokens: 2 for the pair itself and a 2-token query slot "
                "(Zoology's num_kv_pairs * 4 <= input_seq_len)",
                (f"lower data.num_pairs to at most {most} or " if most else "")
                + f"raise data.seq_len to {need}"))
        keys = self.vocab_size // 2 - 1
        if self.num_pairs > keys:
            out.append((
                f"data.num_pairs={self.num_pairs} distinct keys do not fit in the key half of "
                f"data.vocab_size={self.vocab_size} ({keys} keys)", "num_pairs",
                "keys are distinct within a sequence and drawn from ids 1 .. vocab_size/2 - 1",
                f"lower data.num_pairs to at most {keys} or raise data.vocab_size to "
                f"{2 * (self.num_pairs + 1)}"))
        return out


# --------------------------------------------------------------------------------------------
# MAD
# --------------------------------------------------------------------------------------------
class InContextRecallData(TaskData):
    """In-context recall (MAD, multi-query as in its benchmark). The sequence is ``seq_len/2``
    key-value pairs; keys repeat (drawn with replacement from the lower half of the
    vocabulary), each key keeps one value per sequence; the last pair repeats a key seen
    before. Scored: every value whose key appeared earlier in the sequence."""

    task: Literal["in_context_recall"] = "in_context_recall"
    vocab_size: int = Field(16, ge=2)
    """Vocabulary: keys are the lower half, values the upper half (MAD baseline: 16)."""
    seq_len: int = Field(128, ge=2)
    """Tokens per sequence, even (MAD baseline: 128)."""
    train_size: int | None = Field(12_800, ge=1)
    """Fixed training set (MAD baseline: 12,800); null: fresh sequences every batch."""

    def problems(self) -> list[Problem]:
        return self._even_seq_len("the sequence is 2-token key-value pairs (MAD asserts an "
                                  "even seq_len)") + self._min_seq_len(
            4, "one key-value pair must come before the final query pair")


class NoisyInContextRecallData(InContextRecallData):
    """In-context recall with noise (MAD): each pair before the final one is, with probability
    ``frac_noise``, two tokens from a separate noise vocabulary instead (at least one real pair
    stays). Scored: as in in_context_recall; noise is never scored."""

    task: Literal["noisy_in_context_recall"] = "noisy_in_context_recall"
    vocab_size: int = Field(32, ge=3)
    """Vocabulary, noise tokens included: keys and values share vocab_size - noise_vocab_size
    ids (MAD baseline: 32, of which 16 noise)."""
    noise_vocab_size: int = Field(16, ge=1)
    """Noise tokens, the top ids of the vocabulary (MAD baseline: 16)."""
    frac_noise: float = Field(0.2, ge=0, lt=1)
    """Probability that a pair is noise (MAD baseline: 0.2)."""

    def problems(self) -> list[Problem]:
        out = super().problems()
        kv = self.vocab_size - self.noise_vocab_size
        if kv < 2:
            out.append((
                f"data.noise_vocab_size={self.noise_vocab_size} leaves {kv} of "
                f"data.vocab_size={self.vocab_size} ids for keys and values", "noise_vocab_size",
                "keys and values need at least one id each",
                f"lower data.noise_vocab_size to at most {self.vocab_size - 2} or raise "
                f"data.vocab_size to {self.noise_vocab_size + 2}"))
        return out


class FuzzyInContextRecallData(TaskData):
    """Fuzzy in-context recall (MAD, multi-query): keys are 1 .. k_motif_size distinct tokens,
    values 1 .. v_motif_size distinct tokens; key-value pairs follow each other, the last one
    repeats a pair of the sequence, and pad tokens fill the start. Test keys all have
    k_motif_size tokens (as in MAD). Scored: every value token of a pair whose key appeared
    earlier."""

    task: Literal["fuzzy_in_context_recall"] = "fuzzy_in_context_recall"
    vocab_size: int = Field(16, ge=3)
    """Vocabulary: the top id pads, keys take the lower half of the rest, values the upper
    half (MAD baseline: 16)."""
    seq_len: int = Field(128, ge=3)
    """Tokens per sequence (MAD baseline: 128)."""
    k_motif_size: int = Field(3, ge=1)
    """Most tokens in a key (MAD baseline: 3)."""
    v_motif_size: int = Field(3, ge=1)
    """Most tokens in a value (MAD baseline: 3)."""
    train_size: int | None = Field(12_800, ge=1)
    """Fixed training set (MAD baseline: 12,800); null: fresh sequences every batch."""

    def problems(self) -> list[Problem]:
        widest = self.k_motif_size + self.v_motif_size
        out = self._min_seq_len(
            2 * widest + 1,
            f"pairs are added while they start before seq_len - (k_motif_size + v_motif_size) "
            f"- (the final query pair's length), as in MAD, and the final pair repeats one of "
            f"them: with pairs of up to {widest} tokens that needs seq_len >= 2 * {widest} + 1",
            "lower data.k_motif_size / data.v_motif_size")
        keys = (self.vocab_size - 1) // 2
        values = self.vocab_size - 1 - keys
        for name, size, have, half in (("k_motif_size", self.k_motif_size, keys, "lower"),
                                       ("v_motif_size", self.v_motif_size, values, "upper")):
            if size > have:
                out.append((
                    f"data.{name}={size} distinct tokens do not fit in the {half} half of the "
                    f"non-pad vocabulary ({have} ids of data.vocab_size={self.vocab_size})",
                    name, "the tokens of one key or value are distinct (MAD draws permutations)",
                    f"lower data.{name} to at most {have} or raise data.vocab_size to "
                    f"{2 * size + 1 if half == 'lower' else 2 * size}"))
        return out


class SelectiveCopyingData(TaskData):
    """Selective copying (MAD): ``num_tokens_to_copy`` random tokens scattered among blanks,
    a copy token, then blanks; the model writes the tokens in order, one per trailing blank.
    Scored: the trailing blank positions (targets: the tokens to copy)."""

    task: Literal["selective_copying"] = "selective_copying"
    vocab_size: int = Field(16, ge=3)
    """Vocabulary: the top two ids are the copy and blank tokens (MAD baseline: 16)."""
    seq_len: int = Field(128, ge=4)
    """Tokens per sequence (MAD baseline: 256, halved for CPU)."""
    num_tokens_to_copy: int = Field(16, ge=1)
    """Tokens to copy (MAD baseline: 16)."""
    train_size: int | None = Field(12_800, ge=1)
    """Fixed training set (MAD baseline: 12,800); null: fresh sequences every batch."""

    def problems(self) -> list[Problem]:
        need = 2 * self.num_tokens_to_copy + 2
        return self._min_seq_len(
            need, f"the {self.num_tokens_to_copy} tokens, at least one blank among them, the "
            f"copy token and {self.num_tokens_to_copy} trailing blanks take "
            f"2 * num_tokens_to_copy + 2 = {need} tokens (MAD: seq_len > "
            "2 * num_tokens_to_copy + 1)",
            f"lower data.num_tokens_to_copy to at most {max((self.seq_len - 2) // 2, 1)}")


class CompressionData(TaskData):
    """Compression (MAD) as a causal sequence: seq_len/2 random tokens, then the compression
    token repeated seq_len/2 times; at the j-th compression token the model writes the j-th
    token. Scored: every reconstructed token. (MAD reconstructs the sequence with an MLP
    decoder from the compression token's output alone; here later positions can still read
    the tokens, so only models that attend back avoid holding them in their state.)"""

    task: Literal["compression"] = "compression"
    vocab_size: int = Field(16, ge=2)
    """Vocabulary: the top id is the compression token (MAD baseline: 16)."""
    seq_len: int = Field(32, ge=2)
    """Tokens per sequence, even: seq_len/2 tokens to compress and as many to reconstruct
    (MAD baseline: 32 tokens, 31 of them compressed; here 16 of 32)."""
    train_size: int | None = Field(12_800, ge=1)
    """Fixed training set (MAD baseline: 12,800); null: fresh sequences every batch."""

    def problems(self) -> list[Problem]:
        return self._even_seq_len("the sequence is seq_len/2 tokens, then as many positions that "
                                  "reconstruct them")


class MemorizationData(TaskData):
    """Memorization (MAD): a fixed key -> value map, set by ``seed`` and the same in training
    and test, is learnt in the weights. A sequence is ``seq_len/2`` pairs ``key insert``;
    scored: each insert token (target: the key's value)."""

    task: Literal["memorization"] = "memorization"
    vocab_size: int = Field(256, ge=3)
    """Vocabulary: the top id is the insert token, keys the lower half of the rest, values the
    upper half; (vocab_size - 1) // 2 facts (MAD baseline: 256)."""
    seq_len: int = Field(32, ge=2)
    """Tokens per sequence, even (MAD baseline: 32)."""
    train_size: int | None = Field(256, ge=1)
    """Fixed training set (MAD baseline: 256); null: fresh sequences every batch."""

    def problems(self) -> list[Problem]:
        return self._even_seq_len("the sequence is 2-token pairs of a key and the insert token")


TASKS: dict[str, type[TaskData]] = {
    "mqar": MQARData,
    "in_context_recall": InContextRecallData,
    "noisy_in_context_recall": NoisyInContextRecallData,
    "fuzzy_in_context_recall": FuzzyInContextRecallData,
    "selective_copying": SelectiveCopyingData,
    "compression": CompressionData,
    "memorization": MemorizationData,
}
"""Task name -> settings model; ``composer.run.tasks`` has a generator for each."""
