"""The recipe schema: Pydantic models for ``model``, ``data``, ``train`` and ``kernels``.

Pure data: every section forbids unknown keys and documents each field, and nothing here looks
at other fields or the registries. :func:`composer.recipe.validate.validate_recipe` validates a
plain dict against these models and then expands the schedule, which fills the private
``ModelConfig._specs`` and ``Recipe._schedule``. ``hycomp schema`` prints the JSON schema.

A recipe is data: block types are registry keys, never import paths, and nothing in a recipe is
executed.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, PrivateAttr, Tag, field_validator

from composer.core.block import BlockSpec, Spec
from composer.recipe.tasks import TASKS

# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------
FORMS = ("ratio", "pattern", "layers", "segments")
MAX_DEPTH = 100_000
"""Most schedule entries a recipe may have (the layer graph holds a node per sub-layer; past
this, a typo such as an extra three zeros would build for minutes before saying anything)."""


class Selector(Spec):
    """Which schedule entries a per-layer override applies to. Criteria combine with AND;
    indices count schedule entries from 0 (negative counts from the end)."""

    indices: list[int] | None = None
    """Explicit entry indices, e.g. [5, 11, 17, 23]."""
    every: int | None = Field(None, ge=1)
    """Every k-th entry ..."""
    offset: int = Field(0, ge=0)
    """... starting at this index (with `every`)."""
    first: int | None = Field(None, ge=1)
    """The first n entries."""
    last: int | None = Field(None, ge=1)
    """The last n entries."""
    block: str | None = None
    """Only entries whose block name is this."""


class LayerOverride(Spec):
    """Changes for the selected entries: swap the block, set block fields, or swap the FFN."""

    select: Selector
    """Which entries."""
    block: str | None = None
    """Replace the entry's block by this block name."""
    set: dict[str, Any] = Field(default_factory=dict)
    """Block fields to set on the selected entries (validated against the block's spec)."""
    ffn: str | None = None
    """Replace the FFN that follows the selected entries (HF counting) by this block name."""


class ScheduleForms(Spec):
    """The four ways to write a schedule; exactly one of ratio / pattern / layers / segments."""

    ratio: str | None = None
    """Proportions over `blocks`, e.g. "3:1" or "2:1:1" (quote it in YAML: unquoted 3:1 is a
    base-60 number there)."""
    blocks: list[str] | None = None
    """Block names the ratio parts refer to, in order, e.g. [mamba2, attention]."""
    placement: Literal["even", "period"] = "even"
    """How a ratio is laid out: `even` (Megatron-LM's allocator) or `period` (repeat a unit).
    `even` is Megatron's exactly, so it can put minority entries side by side: 1:1 over 4
    layers is M**M; `period` gives M*M* (`hycomp check` points this out)."""
    offset: int | None = Field(None, ge=0)
    """With placement=period: index of the first minority layer (default: end of the unit)."""
    pattern: str | None = None
    """One symbol per entry (Megatron-LM symbols M * - E G plus model.symbols); `|` is ignored;
    a pattern shorter than the depth repeats."""
    layers: list[str] | None = None
    """Explicit block name per entry (HF `layer_types` style)."""

    @field_validator("ratio", mode="before")
    @classmethod
    def _ratio_string(cls, v: Any) -> Any:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, int):
            hint = ""
            if v >= 60:
                a, b = divmod(v, 60)
                hint = (f" YAML 1.1 reads an unquoted {a}:{b} as the base-60 number {v}.")
            raise ValueError(f"a ratio is a string like \"3:1\", got the number {v}.{hint} "
                             "Quote the ratio in YAML")
        if isinstance(v, (list, tuple)):
            return ":".join(str(p) for p in v)
        return v

    def form(self) -> str | None:
        given = [f for f in FORMS if getattr(self, f, None) is not None]
        return given[0] if len(given) == 1 else None


class Segment(ScheduleForms):
    """A depth range with its own schedule (the survey's multi-level hybrids)."""

    n_layers: int = Field(ge=1, le=MAX_DEPTH)
    """Entries in this segment."""


class Schedule(ScheduleForms):
    """The layer schedule of the model."""

    segments: list[Segment] | None = None
    """Consecutive depth ranges, each with its own ratio / pattern / layers."""
    overrides: list[LayerOverride] = Field(default_factory=list)
    """Per-layer changes applied after expansion, in order."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
class ModelConfig(Spec):
    """Model shape, block settings and the layer schedule."""

    vocab_size: int = Field(256, ge=2)
    """Vocabulary size (256 for byte-level text)."""
    d_model: int = Field(128, ge=1)
    """Residual stream width."""
    n_layers: int | None = Field(None, ge=1, le=MAX_DEPTH)
    """Schedule entries. With FFN-free schedules and `ffn` set, each entry is an HF-style layer
    (mixer + FFN); else one residual sub-layer per entry (Megatron counting). Null: the length
    of the pattern / list / segments."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Pre-norm of every sub-layer and the final norm."""
    norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of the norms."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head (saves vocab x d_model parameters)."""
    max_seq_len: int = Field(2048, ge=1)
    """Longest sequence the model is meant for (RoPE tables, window checks)."""
    init_std: float = Field(0.02, gt=0)
    """Std of the normal init of embeddings and projections (GPT-2's 0.02)."""
    ffn: str | None = "mlp"
    """Block name of the FFN sub-layer after each mixer when the schedule places no FFN blocks
    itself (HF counting). Null: no automatic FFN (Megatron counting)."""
    blocks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Settings per block name. A name is a registered block type, or any new name with
    `kind:` naming the type (e.g. `local: {kind: attention, window: 512}`)."""
    symbols: dict[str, str] = Field(default_factory=dict)
    """Extra pattern symbols: symbol -> block name."""
    shared: list[str] = Field(default_factory=list)
    """Block names whose every placement uses one module (weight sharing, as Zamba's shared
    attention)."""
    schedule: Schedule = Field(default_factory=Schedule)
    """Which block sits at which depth."""

    _specs: dict[str, BlockSpec] = PrivateAttr(default_factory=dict)

    def spec(self, name: str) -> BlockSpec:
        """The validated spec of block name ``name`` (recipe settings over the type's defaults)."""
        return self._specs[name]


class DataConfig(Spec):
    """Training text. Default: the Python standard library's own source, read as bytes."""

    task: Literal["text"] = "text"
    """What the data is: text (this section), or a synthetic task (`data=mqar`,
    docs/tasks.md), whose settings replace these."""
    path: str | None = None
    """A text file or a folder of them; null: the Python standard library's .py files."""
    glob: str = "**/*.py"
    """Files to read inside a folder (also for the default standard-library source)."""
    val_fraction: float = Field(0.05, gt=0, lt=1)
    """Share of files (of bytes, for one file) held out for validation, chosen by a hash of
    the file name so the split never changes."""
    max_bytes: int | None = Field(None, ge=1024)
    """Read at most this many bytes in all (null: everything)."""
    seq_len: int = Field(256, ge=1)
    """Tokens per training sequence."""


def _data_kind(value: Any) -> str:
    """The union member a ``data`` section validates against: its ``task`` (text when absent,
    as in recipes written before tasks existed)."""
    task = value.get("task", "text") if isinstance(value, dict) else getattr(value, "task",
                                                                            "text")
    return task if isinstance(task, str) else "text"


DataSection = Annotated[Union[(Annotated[DataConfig, Tag("text")],
                               *(Annotated[cls, Tag(name)] for name, cls in TASKS.items()))],
                        Discriminator(_data_kind)]
"""``data``: text, or one synthetic task's settings, chosen by ``data.task``."""


class TrainConfig(Spec):
    """The training loop."""

    steps: int = Field(300, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(16, ge=1)
    """Sequences per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = Field(30, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay on matrices (not on norms, biases, or embeddings)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1."""
    beta2: float = Field(0.95, ge=0, lt=1)
    """AdamW beta2."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this (null: no clipping)."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Compute dtype: fp32, or bf16 autocast (weights stay fp32)."""
    seed: int = 0
    """Seeds weights, batch sampling and dropout."""
    device: str = "auto"
    """auto (cuda if present, else cpu), cpu, cuda, cuda:N."""
    threads: int | None = Field(None, ge=1)
    """torch CPU threads (null: torch's default)."""
    eval_every: int = Field(100, ge=1)
    """Steps between validation passes."""
    eval_batches: int = Field(8, ge=1)
    """Batches per validation pass (fixed batches, the same every time)."""
    log_every: int = Field(10, ge=1)
    """Steps between metrics.jsonl lines."""
    ckpt_every: int = Field(100, ge=1)
    """Steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int | None = Field(3, ge=1)
    """Keep only the newest k checkpoints of the run folder (null: keep all)."""
    resume: str | None = None
    """A run folder to continue from its last checkpoint."""
    progress: bool = True
    """Show a progress bar."""
    sample_tokens: int = Field(64, ge=0)
    """At the end of a completed run, print this many bytes the trained model writes (greedy)
    after the start of a validation text, and save them to sample.txt (0: no sample)."""
    max_bad_steps: int = Field(10, ge=1)
    """Stop the run (exit code 3) after this many steps in a row with a non-finite loss or
    gradient; each such step is skipped, not applied."""
    ignore_memory_check: bool = False
    """Train even when the estimated memory of a step exceeds what the machine has free."""
    logger: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    """Extra metric sinks beside metrics.jsonl: tensorboard (event files in the run folder),
    wandb (offline, in the run folder). One name or a list: train.logger=tensorboard."""

    @field_validator("logger", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if v is None or v == "none":
            return []
        return [x for x in v.split(",") if x] if isinstance(v, str) else v


class Recipe(Spec):
    """A whole recipe."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataSection = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    kernels: dict[str, str] = Field(default_factory=dict)
    """Backend per op: auto, or a backend name (`hycomp kernels` lists them)."""

    _schedule: Any = PrivateAttr(default=None)

    @property
    def schedule(self):
        """The expanded schedule (:class:`composer.recipe.schedule.Expanded`)."""
        return self._schedule
