"""Torch-free specs: the validated description of one job.

One spec model per extension kind plus the training spec, each field carrying its own
help text (the README's batch-file reference and the CLI help are generated from it).
Unknown keys are rejected; constraints are declared on the fields.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jobs.extensions import EXTENSION_KINDS
from jobs.metrics import check_metrics, resolve_objective

TASK_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: Job priorities: a free worker takes the queued job of highest priority first.
MIN_PRIORITY, MAX_PRIORITY = 0, 9
#: A reference to a job recorded earlier (any batch), in `needs` and the `from` keys.
JOB_REF_RE = re.compile(r"^job:([0-9a-f]{4,32})$")


def _check_reference(value: str | None) -> str | None:
    if value is not None and not JOB_REF_RE.fullmatch(value) and not TASK_NAME_RE.fullmatch(value):
        raise ValueError(f"{value!r} is neither a job name of this batch nor `job:ID` (an id that "
                         "`graftq results` shows)")
    return value


class JobKind(StrEnum):
    TRAIN = "train"
    CREATE = "create"


class _Spec(BaseModel):
    # populate_by_name: `from` is a Python keyword, so its field is `from_` with the alias `from`.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, populate_by_name=True)


def _check_modules(value: list[str] | None, key: str = "target_modules") -> list[str] | None:
    if value is not None:
        if not value:
            raise ValueError(f"give at least one module name, or leave {key} out for the default")
        if any(not name or not isinstance(name, str) for name in value):
            raise ValueError("module names must be non-empty strings")
    return value


class LoRASpec(_Spec):
    """LoRA adapter settings (PEFT)."""

    r: Annotated[int, Field(gt=0, le=1024, description="Rank of the LoRA update matrices; must be > 0.")] = 8
    alpha: Annotated[
        float, Field(gt=0, description="LoRA scaling numerator (`lora_alpha`); the update is scaled by alpha / r.")
    ] = 16.0
    dropout: Annotated[
        float, Field(ge=0, lt=1, description="Dropout on the LoRA input; 0 <= dropout < 1.")
    ] = 0.05
    target_modules: Annotated[
        list[str] | None,
        Field(
            description="Names (suffixes) of the Linear modules that get adapters. Default by architecture: "
            "T5 q,k,v,o; LLaMA q_proj,k_proj,v_proj,o_proj; GPT-2 c_attn,c_proj; BERT query,key,value."
        ),
    ] = None

    variant: Annotated[
        Literal["lora", "dora", "rslora"],
        Field(description="`lora` (plain), `dora` (DoRA: a trained magnitude per output feature; PEFT's "
              "`use_dora`) or `rslora` (rank-stabilised scaling alpha / sqrt(r); PEFT's `use_rslora`)."),
    ] = "lora"
    init: Annotated[
        Literal["default", "gaussian", "pissa", "olora"],
        Field(description="Adapter initialisation (PEFT's `init_lora_weights`): `default` (B = 0: starts as "
              "a no-op), `gaussian`, `pissa` (principal singular vectors of each weight, by SVD) or `olora` "
              "(QR). pissa and olora move part of each target weight into the adapter; the saved adapter is "
              "converted so that it applies to the unchanged base."),
    ] = "default"

    from_: Annotated[
        str | None,
        Field(alias="from", description="Start from the adapter that another job trained: a job `name` of this "
              "batch or `job:ID`; the job waits for it (continued training, curricula). The adapter's own "
              "settings (r, alpha, target_modules) come with it."),
    ] = None

    @field_validator("from_")
    @classmethod
    def _from(cls, value: str | None) -> str | None:
        return _check_reference(value)

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str] | None) -> list[str] | None:
        return _check_modules(value)


class ExpandSpec(_Spec):
    """LLaMA Pro-style interleaved expansion."""

    every: Annotated[
        int, Field(gt=0, le=1024, description="Group size: a new block after every N base blocks.")
    ]


class LayerSpec(_Spec):
    """Added transformer block settings."""

    stack: Annotated[
        Literal["encoder", "decoder"] | None,
        Field(description="Which stack gets the new block: encoder or decoder. Default: the model's only "
              "stack, or encoder for encoder-decoder models."),
    ] = None
    source: Annotated[
        int | Literal["previous"] | None,
        Field(description="Index of the existing block that is copied (negative counts from the end), or "
              "`previous`: each new block copies the block just before where it goes. Default: the last "
              "block of the stack."),
    ] = None
    position: Annotated[
        int | Literal["end"],
        Field(description="Where the new block is inserted: a block index (0 = before the first block) or "
              "`end`."),
    ] = "end"
    positions: Annotated[
        list[int] | None,
        Field(description="Several new blocks: the index of the base block each one goes before (the stack's "
              "block count = after the last one); two equal indices stack two blocks there. Instead of "
              "`position`."),
    ] = None
    expand: Annotated[
        ExpandSpec | None,
        Field(description="LLaMA Pro's interleaved expansion, `{every: N}`: after each group of N base blocks, a "
              "copy of the group's last block (its output projections scaled by `init_scale`). Instead of "
              "`position`/`positions`/`source`."),
    ] = None
    init_scale: Annotated[
        float,
        Field(ge=0, le=10, description="Factor applied to the new block's output projections (attention "
              "output and MLP output); 0 makes the new block an exact identity at start on pre-norm models "
              "(T5, GPT-2, LLaMA-family, Phi-3, Gemma; not BART, which normalises after each residual sum)."),
    ] = 0.01

    from_: Annotated[
        str | None,
        Field(alias="from", description="Build on the added block(s) that another job trained (a job `name` of "
              "this batch, or `job:ID`), loaded from its artifacts, instead of a new copy; the job waits for it. "
              "The blocks keep that job's placement (stack, positions): this job's placement keys are ignored."),
    ] = None
    freeze: Annotated[
        bool, Field(description="With `from`: keep the loaded block frozen (only LoRA trains; hybrid jobs).")
    ] = False

    @field_validator("from_")
    @classmethod
    def _from(cls, value: str | None) -> str | None:
        return _check_reference(value)

    @field_validator("position")
    @classmethod
    def _position_non_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("position must be a block index >= 0 or 'end'")
        return value

    @field_validator("positions")
    @classmethod
    def _positions(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one block index, or leave positions out")
            if any(index < 0 for index in value):
                raise ValueError("positions must be block indices >= 0")
            if len(value) > 256:
                raise ValueError("at most 256 new blocks")
        return value

    @model_validator(mode="after")
    def _placement_keys(self) -> LayerSpec:
        # judged by value, not by which keys were given: a saved spec (job.json) carries every key
        if self.positions is not None and self.position != "end":
            raise ValueError("set either position (one block) or positions (several), not both")
        if self.expand is not None:
            given = [key for key in ("position", "positions", "source")
                     if getattr(self, key) not in (None, "end")]
            if given:
                raise ValueError(f"expand places its blocks itself: leave {', '.join(given)} out")
        if self.source == "previous" and self.positions is None and self.position == 0:
            raise ValueError("source: previous copies the block before the new one; position 0 has none")
        return self

    @property
    def block_count(self) -> int | None:
        """New blocks this spec adds (None for `expand`: it depends on the model's depth)."""
        if self.expand is not None:
            return None
        return 1 if self.positions is None else len(self.positions)


#: graftq's column names: what `train.columns` maps a source's columns to
COLUMN_NAMES = ("input", "target", "label", "messages")


def _check_columns(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is not None:
        for key, column in value.items():
            if key not in COLUMN_NAMES:
                raise ValueError(f"unknown column {key!r}: map graftq's {', '.join(COLUMN_NAMES)} to the "
                                 "source's column names, e.g. {input: sentence, target: label}")
            if not isinstance(column, str) or not column:
                raise ValueError(f"column {key!r}: give the source's column name as a non-empty string")
    return value


class DatasetSource(_Spec):
    """One entry of a `train.dataset` list written as a mapping."""

    path: Annotated[str, Field(min_length=1, description="A file, a directory, or `hf:NAME[:CONFIG]`.")]
    weight: Annotated[
        float, Field(gt=0, le=1000, description="How much of the source training uses: its training rows "
                     "`weight` times, the fractional part a seeded sample of them (0.5 = half of the rows).")
    ] = 1.0
    columns: Annotated[
        dict[str, str] | None, Field(description="Column mapping for this source; wins over `train.columns`.")
    ] = None
    split: Annotated[str | None, Field(min_length=1, description="Split of this source; default `train.split`.")] = None

    @field_validator("columns")
    @classmethod
    def _columns(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _check_columns(value)


_TARGETS_HELP = ("Names (suffixes) of the Linear modules that get adapters. Default: the family's LoRA targets "
                 "(see `lora.target_modules`).")


class _AdapterSpec(_Spec):
    """What every PEFT method's section has: the modules it adapts."""

    target_modules: Annotated[list[str] | None, Field(description=_TARGETS_HELP)] = None

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: list[str] | None) -> list[str] | None:
        return _check_modules(value)


class IA3Spec(_AdapterSpec):
    """IA3 settings (PEFT): learned scaling vectors on the target modules' activations."""

    target_modules: Annotated[
        list[str] | None,
        Field(description="Modules whose activations IA3 scales. Default by architecture: T5 k,v,wo; LLaMA "
              "k_proj,v_proj,down_proj; GPT-2 c_attn,mlp.c_proj; BERT key,value,output.dense."),
    ] = None
    feedforward_modules: Annotated[
        list[str] | None,
        Field(description="Which of target_modules are MLP layers (IA3 scales their input, not their output). "
              "Default: the family's MLP output projection (T5 wo, LLaMA down_proj, GPT-2 mlp.c_proj) when "
              "target_modules is left out, else none."),
    ] = None

    @field_validator("feedforward_modules")
    @classmethod
    def _feedforward(cls, value: list[str] | None) -> list[str] | None:
        return _check_modules(value, "feedforward_modules")

    @model_validator(mode="after")
    def _feedforward_targeted(self) -> IA3Spec:
        if self.feedforward_modules is not None and self.target_modules is not None:
            extra = [name for name in self.feedforward_modules if name not in self.target_modules]
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules; every feedforward "
                                 "module must also be a target")
        return self


class LoHaSpec(_AdapterSpec):
    """LoHa settings (PEFT): the update is a Hadamard product of two low-rank products."""

    r: Annotated[int, Field(gt=0, le=1024, description="Rank of each low-rank factor pair; must be > 0.")] = 8
    alpha: Annotated[float, Field(gt=0, description="Scaling numerator: the update is scaled by alpha / r.")] = 8.0
    rank_dropout: Annotated[
        float, Field(ge=0, lt=1, description="Dropout on the update's rank dimension during training.")
    ] = 0.0
    module_dropout: Annotated[
        float, Field(ge=0, lt=1, description="Probability of skipping a module's update during training.")
    ] = 0.0


class LoKrSpec(LoHaSpec):
    """LoKr settings (PEFT): the update is a Kronecker product with a low-rank factor."""

    r: Annotated[int, Field(gt=0, le=1024, description="Rank of the low-rank Kronecker factor; must be > 0.")] = 8


class AdaLoRASpec(_AdapterSpec):
    """AdaLoRA settings (PEFT): SVD-form LoRA whose rank budget is reallocated during training."""

    init_r: Annotated[int, Field(gt=0, le=1024, description="Rank each module starts with.")] = 12
    target_r: Annotated[
        int, Field(gt=0, le=1024, description="Average rank per module at the end of the budget schedule.")
    ] = 8
    alpha: Annotated[float, Field(gt=0, description="Scaling numerator (`lora_alpha`).")] = 8.0
    dropout: Annotated[float, Field(ge=0, lt=1, description="Dropout on the adapter input.")] = 0.0
    tinit: Annotated[int, Field(ge=0, description="Steps of warm-up before ranks are pruned.")] = 0
    tfinal: Annotated[int, Field(ge=0, description="Final steps trained at the target budget, ranks fixed.")] = 0
    deltaT: Annotated[int, Field(gt=0, description="Steps between two budget reallocations.")] = 1
    beta1: Annotated[float, Field(gt=0, lt=1, description="EMA factor of the sensitivity smoothing.")] = 0.85
    beta2: Annotated[float, Field(gt=0, lt=1, description="EMA factor of the uncertainty quantification.")] = 0.85
    orth_reg_weight: Annotated[
        float, Field(ge=0, description="Weight of the orthogonality regulariser added to the loss.")
    ] = 0.5
    total_step: Annotated[
        int | None,
        Field(gt=0, description="Length of the budget schedule in optimizer steps. Default: train.max_steps "
              "(needed: a job with only train.epochs sets this)."),
    ] = None

    @model_validator(mode="after")
    def _ranks(self) -> AdaLoRASpec:
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) is above init_r ({self.init_r}); AdaLoRA only prunes "
                             "ranks: lower target_r or raise init_r")
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit ({self.tinit}) + tfinal ({self.tfinal}) leave no steps of total_step "
                             f"({self.total_step}) for reallocating ranks; lower them or train longer")
        return self


class EarlyStoppingSpec(_Spec):
    """Stop training when the evaluations stop improving (needs `train.eval_every`)."""

    metric: Annotated[
        str, Field(min_length=1, description="What is watched: `eval_loss` or one of the job's `train.metrics`. It "
                   "also chooses the step that `keep: best` keeps.")
    ] = "eval_loss"
    mode: Annotated[
        Literal["min", "max"] | None,
        Field(description="`min` (lower is better) or `max`. Default: min for eval_loss, max for the task metrics "
              "(exact_match, accuracy, bleu, ...)."),
    ] = None
    patience: Annotated[
        int, Field(ge=1, le=100_000, description="Stop after this many evaluations in a row that do not improve on "
                   "the best by more than min_delta.")
    ] = 3
    min_delta: Annotated[
        float, Field(ge=0, description="How much an evaluation must beat the best by to reset the patience count.")
    ] = 0.0

    @property
    def maximize(self) -> bool:
        """Whether higher values of `metric` are better (`mode`, else the metric's own direction)."""
        if self.mode is not None:
            return self.mode == "max"
        from jobs.metrics import METRICS

        return self.metric in METRICS and METRICS[self.metric].higher_is_better


def _check_eval_source(value: str | DatasetSource, key: str) -> str | DatasetSource:
    path = value if isinstance(value, str) else value.path
    if not path.strip():
        raise ValueError(f"{key}: the path is empty")
    if path.startswith("hf:"):
        from jobs.sources import parse_hub

        parse_hub(path)
    if isinstance(value, DatasetSource) and value.weight != 1:
        raise ValueError(f"{key}: `weight` mixes training sources; an evaluation set is read whole: leave it out")
    return value


class EvalSpec(_Spec):
    """Named evaluation sets, evaluated after training on the kept weights (train jobs)."""

    datasets: Annotated[
        dict[str, str | DatasetSource],
        Field(description="name -> a dataset in train.dataset's formats (a path, `hf:NAME`, or `{path, columns, "
              "split}`), e.g. `{task_a: data/a_eval.jsonl}`: eval loss and every `train.metrics` metric on each, "
              "stored per name (`eval_sets`); measures what a job does to other tasks (forgetting)."),
    ] = {}

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, value: dict[str, str | DatasetSource]) -> dict[str, str | DatasetSource]:
        if len(value) > 64:
            raise ValueError("at most 64 evaluation sets")
        for name, source in value.items():
            if not TASK_NAME_RE.fullmatch(name):
                raise ValueError(f"evaluation set name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
            _check_eval_source(source, f"set {name!r}")
        return value
class ResourcesSpec(_Spec):
    """What a job needs of the host that runs it."""

    gpus: Annotated[
        int,
        Field(ge=1, le=64, description="GPUs the job trains on, data-parallel: one process per GPU, gradients "
              "all-reduced (NCCL; gloo on a CPU host started with `graftq worker --cpu-slots N`). "
              "`train.batch_size` and `grad_accum_steps` keep their meaning for the whole step, so the "
              "result does not depend on the count. A worker takes the job only when that many of its GPUs "
              "are free."),
    ] = 1


class TrainSpec(_Spec):
    """Training settings."""

    dataset: Annotated[
        str | list[str | DatasetSource],
        Field(description="The training data: a JSONL, CSV or Parquet file, a directory written by "
              "`datasets`' `save_to_disk`, or `hf:NAME[:CONFIG]` (a Hugging Face hub dataset from the local "
              "cache). A list is a mixture (their rows together); an item may be a mapping `{path, weight, "
              "columns, split}`: weight 2 uses the source's rows twice, 0.5 a seeded half of them. Relative "
              "paths are resolved against the batch file's directory."),
    ]
    columns: Annotated[
        dict[str, str] | None,
        Field(description="Which column of the data holds each of graftq's columns (`input`, `target`, `label`, "
              "`messages`), e.g. `{input: sentence, target: label}`; unmapped ones keep their names."),
    ] = None
    split: Annotated[
        str, Field(min_length=1, description="The split read from a `save_to_disk` DatasetDict or an `hf:` "
                   "dataset.")
    ] = "train"
    format: Annotated[
        Literal["text", "chat"],
        Field(description="`text`: `input`/`target` pairs. `chat` (decoder-only models): a `messages` column "
              "(lists of `{role, content}`) rendered with the tokenizer's chat template, the loss on the "
              "assistant turns only."),
    ] = "text"
    max_steps: Annotated[
        int | None, Field(ge=0, description="Number of optimizer steps; wins over `epochs` when both are set; 100 when "
                          "neither is. 0 evaluates the extension as built, untrained: for a lora job, the base "
                          "model itself (LoRA starts as a no-op), a baseline for the trained jobs' metrics.")
    ] = None
    epochs: Annotated[
        float | None, Field(gt=0, description="Passes over the training split, used when max_steps is not set.")
    ] = None
    batch_size: Annotated[int, Field(gt=0, le=4096, description="Examples per forward pass (per optimizer "
                                     "step without `grad_accum_steps`).")] = 8
    eval_batch_size: Annotated[
        int | None, Field(gt=0, le=4096, description="Examples per evaluation forward pass; default: batch_size.")
    ] = None
    learning_rate: Annotated[float, Field(gt=0, lt=1, description="Peak learning rate (after the warm-up).")] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, lt=1, description="Decoupled weight decay (as in AdamW).")] = 0.0
    warmup_steps: Annotated[int, Field(ge=0, description="Linear learning-rate warm-up steps.")] = 0
    lr_scheduler: Annotated[
        Literal["constant", "linear", "cosine"],
        Field(description="Learning rate after the warm-up: `constant`, or `linear` or `cosine` decay towards 0 "
              "over the remaining steps."),
    ] = "constant"
    optimizer: Annotated[
        Literal["adamw", "adafactor", "adamw_8bit"],
        Field(description="`adamw` (torch), `adafactor` (transformers; fixed learning rate, no relative step) "
              "or `adamw_8bit` (bitsandbytes, CUDA only)."),
    ] = "adamw"
    grad_accum_steps: Annotated[
        int, Field(ge=1, le=1024, description="Micro-batches of batch_size per optimizer step: the effective "
                   "batch is batch_size x grad_accum_steps, and its gradient is that of one large batch "
                   "(token-weighted).")
    ] = 1
    max_grad_norm: Annotated[
        float | None, Field(ge=0, description="Clip the gradients' global norm to this before each step; 0 or "
                            "null: no clipping.")
    ] = 1.0
    gradient_checkpointing: Annotated[
        bool, Field(description="Recompute activations in the backward pass instead of keeping them: less "
                    "memory, about a third more compute.")
    ] = False
    loraplus_lr_ratio: Annotated[
        float | None, Field(gt=0, le=1000, description="LoRA+: the LoRA B matrices train at learning_rate x "
                            "this ratio (PEFT's `create_loraplus_optimizer`; 16 in the paper). LoRA adapters "
                            "only (lora and hybrid jobs).")
    ] = None
    eval_fraction: Annotated[
        float, Field(ge=0, lt=1, description="Fraction of the dataset held out for evaluation (0 = no eval).")
    ] = 0.1
    objective: Annotated[
        Literal["seq2seq", "causal", "classification"] | None,
        Field(description="`seq2seq`, `causal` or `classification` (a `label` column instead of `target`; a "
              "classification head trains with the extension). Default by the base's family: seq2seq on "
              "encoder-decoder, causal on decoder-only, classification on encoder-only models."),
    ] = None
    metrics: Annotated[
        list[str] | None,
        Field(description="Task metrics computed on the eval split after training (see `jobs/metrics.py`): "
              "`accuracy`, `f1` (macro) for classification; `exact_match`, `char_accuracy`, `token_accuracy`, `bleu`, "
              "`rouge_l` for seq2seq and causal jobs (on greedy generations of the eval inputs). Default: the "
              "objective's defaults (classification: accuracy, f1; seq2seq and causal: exact_match, "
              "char_accuracy)."),
    ] = None
    max_new_tokens: Annotated[
        int | None,
        Field(gt=0, le=8192, description="Generation length limit for the generative metrics (and the default of "
              "`graftq predict --max-new-tokens`). Default: the longest eval target in tokens + 8, at most "
              "max_length (targets are truncated to max_length in training, so longer was never learned)."),
    ] = None
    num_samples: Annotated[
        int, Field(ge=0, le=100, description="How many input / target / prediction triples of the eval split (its "
                   "first rows) the job stores for `graftq show` (0 = none).")
    ] = 5
    max_length: Annotated[
        int, Field(gt=0, le=8192, description="Token limit applied to inputs and targets (truncation).")
    ] = 64
    eval_every: Annotated[
        int | None,
        Field(gt=0, description="Evaluate every N optimizer steps (and after the last): eval loss and every "
              "`metrics` metric, recorded as curve points; enables `early_stopping` and `keep: best`."),
    ] = None
    early_stopping: Annotated[
        EarlyStoppingSpec | None,
        Field(description="`{metric, mode, patience, min_delta}` (see its keys): stop after `patience` evaluations "
              "without improvement of `metric` (eval_loss or a `metrics` name). Needs eval_every."),
    ] = None
    keep: Annotated[
        Literal["best", "last"] | None,
        Field(description="Which weights are saved: `best` (the evaluation with the best `early_stopping.metric`, "
              "default eval_loss; recorded as best_step/best_metric/best_value) or `last`. Default: best with "
              "eval_every, else last."),
    ] = None
    eval_dataset: Annotated[
        str | DatasetSource | None,
        Field(description="A separate evaluation set (train.dataset's formats) instead of holding out "
              "`eval_fraction` of the training data; then all of train.dataset trains."),
    ] = None
    seed: Annotated[int, Field(ge=0, description="Seed for the data split, shuffling and initialisation.")] = 0
    checkpoint_every: Annotated[
        int, Field(ge=0, description="Save a resumable training checkpoint every N steps (0 = never).")
    ] = 50
    report_to: Annotated[
        list[Literal["tensorboard", "mlflow"]],
        Field(description="Experiment trackers that get the losses and metrics, as in Hugging Face's "
              "`report_to`: `tensorboard` (event files in the job directory's `tensorboard/`; install "
              "graftq[tensorboard]) and `mlflow` (one run per job, named after its id, with the spec as params "
              "and job.json and the saved adapter/block as artifacts, at GRAFTQ_MLFLOW_TRACKING_URI, default a "
              "SQLite store in the artifacts directory; install graftq[mlflow])."),
    ] = []

    @field_validator("report_to")
    @classmethod
    def _report_to(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a tracker is named twice in report_to")
        return value

    @field_validator("dataset", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        # Each item checked here, so that a mistake in one reads as one line naming the item, not as
        # every way the union of a string and a mapping could fail.
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("give a file, a directory or hf:NAME, or a list of them (an item may be a mapping "
                             "{path, weight, columns, split})")
        items = []
        for index, item in enumerate(value):
            if isinstance(item, str | DatasetSource):
                items.append(item)
            elif isinstance(item, dict):
                unknown = sorted(set(item) - set(DatasetSource.model_fields))
                if unknown:
                    raise ValueError(f"item {index}: unknown key `{unknown[0]}` (a source mapping has "
                                     f"{', '.join(DatasetSource.model_fields)})")
                try:
                    items.append(DatasetSource.model_validate(item))
                except ValidationError as error:
                    first = error.errors()[0]
                    where = ".".join(str(part) for part in first["loc"])
                    raise ValueError(f"item {index}: `{where}`: {first['msg'].removeprefix('Value error, ')}") \
                        from None
            else:
                raise ValueError(f"item {index}: give a path or hf:NAME, or a mapping {{path, weight, columns, "
                                 f"split}} (got {item!r})")
        return items

    @field_validator("dataset")
    @classmethod
    def _datasets(cls, value: str | list[str | DatasetSource]) -> str | list[str | DatasetSource]:
        if isinstance(value, list) and not value:
            raise ValueError("give a file, or a non-empty list of files")
        for item in [value] if isinstance(value, str) else value:
            path = item if isinstance(item, str) else item.path
            if not path.strip():
                raise ValueError("a dataset path is empty")
            if path.startswith("hf:"):
                from jobs.sources import parse_hub

                parse_hub(path)  # ValueError saying what is wrong
        return value

    @field_validator("columns")
    @classmethod
    def _columns(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _check_columns(value)

    @property
    def sources(self) -> list[DatasetSource]:
        """`dataset` as a list of sources, each with its own `columns` merged over `train.columns` and
        its split."""
        items = [self.dataset] if isinstance(self.dataset, str) else self.dataset
        sources = []
        for item in items:
            source = DatasetSource(path=item) if isinstance(item, str) else item
            sources.append(source.model_copy(update={"columns": {**(self.columns or {}), **(source.columns or {})},
                                                     "split": source.split or self.split}))
        return sources

    @field_validator("eval_dataset")
    @classmethod
    def _eval_dataset(cls, value: str | DatasetSource | None) -> str | DatasetSource | None:
        return None if value is None else _check_eval_source(value, "eval_dataset")

    @model_validator(mode="after")
    def _evaluation(self) -> TrainSpec:
        if self.eval_every is None:
            for key in ("early_stopping", "keep"):
                if getattr(self, key) is not None and (key != "keep" or self.keep == "best"):
                    raise ValueError(f"train.{key}: needs periodic evaluation; set train.eval_every (e.g. 50), or "
                                     f"leave {key} out")
        elif self.eval_dataset is None and self.eval_fraction == 0:
            raise ValueError("train.eval_every: there is nothing to evaluate with eval_fraction: 0; set "
                             "train.eval_fraction above 0 or give train.eval_dataset")
        check_watched_metric(self)
        return self

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return None if value is None else check_metrics(value, info.data.get("objective"))

    @property
    def keep_best(self) -> bool:
        """Whether the saved weights are the best evaluation's (`keep`, default best with eval_every)."""
        return self.keep == "best" or (self.keep is None and self.eval_every is not None)

    @property
    def eval_source(self) -> DatasetSource | None:
        """`eval_dataset` as a source, with `train.columns` and `train.split` where it sets none."""
        return None if self.eval_dataset is None else as_source(self.eval_dataset, self.columns, self.split)

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimizer step."""
        return self.batch_size * self.grad_accum_steps

    @property
    def datasets(self) -> list[str]:
        """The paths (or `hf:` references) of `dataset`."""
        return [source.path for source in self.sources]

    @property
    def needed_columns(self) -> tuple[str, ...]:
        """graftq's columns every source must provide (after `columns` maps them)."""
        if self.format == "chat":
            return ("messages",)
        return ("input", "label") if self.objective == "classification" else ("input", "target")

    @model_validator(mode="after")
    def _length(self) -> TrainSpec:
        if self.max_steps is None and self.epochs is None:
            object.__setattr__(self, "max_steps", 100)
        return self


class JobSpec(_Spec):
    """One job of a batch, after `defaults` were merged in."""

    task: Annotated[
        str,
        Field(description="Task name: letters, digits, '.', '_' and '-', at most 64 characters. Used in "
              "artifact paths."),
    ]
    name: Annotated[
        str | None,
        Field(description="A name for the job, unique in the batch (same characters as `task`): what `needs` "
              "and the `from` keys of other jobs refer to. Every job a `matrix` makes of it shares it."),
    ] = None
    needs: Annotated[
        list[str],
        Field(description="Jobs this one waits for: names in this batch, or `job:ID` of an earlier batch. It "
              "stays `waiting` until they all succeed, and is `skipped` if one does not."),
    ] = []
    kind: Annotated[
        JobKind, Field(description="`train` (build, train, save) or `create` (build, statistics, save).")
    ] = JobKind.TRAIN
    priority: Annotated[
        int | None,
        Field(ge=MIN_PRIORITY, le=MAX_PRIORITY, strict=True,
              description="0-9, higher first: a free worker takes the queued job of highest priority (jobs of "
              "equal priority in submission order). Default: the batch file's top-level `priority`, or 0."),
    ] = None
    extension: Annotated[
        str, Field(description="One of the extension kinds registered in `jobs/extensions.py`: "
                   f"{', '.join(f'`{kind}`' for kind in EXTENSION_KINDS)}.")
    ]
    base_model: Annotated[
        str,
        Field(description="A Hugging Face hub id (from the local cache), a local model directory, or "
              "`random:<preset>`."),
    ]
    device: Annotated[str, Field(description="`auto`, `cpu`, `cuda`, `mps`, or `cuda:N` with `graftq run` "
                                 "(a pool worker owns one GPU: `cuda`).")] = "auto"
    dtype: Annotated[
        Literal["auto", "float32", "bfloat16", "float16"],
        Field(description="Dtype of the frozen base weights (trainable ones are float32). `auto`: bfloat16 on "
              "CUDA of compute capability 8.0+, float16 on older CUDA (float32 for T5-family bases), float32 "
              "on MPS and CPU. On a CPU, bfloat16 halves the base's memory."),
    ] = "auto"
    quantize: Annotated[
        Literal["4bit", "8bit"] | None,
        Field(description="QLoRA: load the frozen base quantised with bitsandbytes (`4bit`: NF4 with double "
              "quantisation; `8bit`: LLM.int8), on CUDA only (install graftq[qlora]); adapter kinds only "
              "(lora, adalora, ia3, loha, lokr), no added block."),
    ] = None
    adalora: Annotated[
        AdaLoRASpec | None, Field(description="AdaLoRA settings (adalora jobs).")
    ] = None
    ia3: Annotated[IA3Spec | None, Field(description="IA3 settings (ia3 and hybrid-ia3 jobs).")] = None
    loha: Annotated[LoHaSpec | None, Field(description="LoHa settings (loha and hybrid-loha jobs).")] = None
    lokr: Annotated[LoKrSpec | None, Field(description="LoKr settings (lokr and hybrid-lokr jobs).")] = None
    lora: Annotated[LoRASpec | None, Field(description="LoRA settings (lora and hybrid jobs).")] = None
    layer: Annotated[LayerSpec | None, Field(description="Added-layer settings (layer and hybrid jobs).")] = None
    train: Annotated[TrainSpec | None, Field(description="Training settings (train jobs).")] = None
    eval: Annotated[
        EvalSpec | None, Field(description="Evaluation sets evaluated after training (train jobs; see `eval.datasets`).")
    ] = None
    resources: Annotated[ResourcesSpec, Field(description="What the job needs of its host (`gpus`).")] = \
        ResourcesSpec()

    @field_validator("task")
    @classmethod
    def _task_name(cls, value: str) -> str:
        if not TASK_NAME_RE.fullmatch(value) or value in {".", ".."}:
            shown = value if len(value) <= 70 else value[:67] + "..."
            raise ValueError(
                f"invalid task name {shown!r}: use 1-64 letters, digits, '.', '_' or '-' "
                "(no slashes, no spaces); it becomes part of the artifact path"
            )
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (not TASK_NAME_RE.fullmatch(value) or value in {".", ".."}):
            raise ValueError(f"invalid job name {value!r}: use 1-64 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("needs")
    @classmethod
    def _needs(cls, value: list[str]) -> list[str]:
        for item in value:
            _check_reference(item)
        if len(set(value)) != len(value):
            raise ValueError("a job is named twice in `needs`")
        return value

    @field_validator("extension")
    @classmethod
    def _extension(cls, value: str) -> str:
        if value not in EXTENSION_KINDS:
            kinds = [repr(kind) for kind in EXTENSION_KINDS]
            raise ValueError(f"unknown extension kind {value!r}: use {', '.join(kinds[:-1])} or {kinds[-1]}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"unknown device {value!r}: use auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("quantize")
    @classmethod
    def _quantize(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        device, extension = info.data.get("device"), info.data.get("extension")
        if device in ("cpu", "mps"):
            raise ValueError(f"quantize: {value} needs a CUDA GPU (bitsandbytes) and this job asks for device: "
                             f"{device}; set device: cuda (or auto on a GPU worker), or leave quantize out")
        if extension in EXTENSION_KINDS and "layer" in EXTENSION_KINDS[extension].sections:
            raise ValueError(f"quantize: a {extension} job copies a block of the base, and a quantised block "
                             "cannot train; use an adapter kind (lora, adalora, ia3, loha, lokr), or leave "
                             "quantize out")
        return value

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("base_model is empty: give a hub id, a local directory or random:<preset>")
        if value.startswith("random:"):
            from jobs.presets import PRESET_NAMES

            name = value.removeprefix("random:")
            if name not in PRESET_NAMES:
                raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESET_NAMES))}")
        return value

    @model_validator(mode="after")
    def _sections(self) -> JobSpec:
        used = EXTENSION_KINDS[self.extension].sections
        # Sections the kind does not use are dropped rather than refused: batch `defaults` carry
        # every section, and a lora job inheriting layer defaults is not a mistake.
        for name in {name for kind in EXTENSION_KINDS.values() for name in kind.sections}:
            object.__setattr__(self, name, (getattr(self, name) or SECTION_SPECS[name]()) if name in used else None)
        if self.kind == JobKind.TRAIN:
            if self.train is None:
                raise ValueError("a train job needs a `train` section with at least `dataset` "
                                 "(or set kind: create)")
            if self.base_model.startswith("random:"):
                from jobs.presets import PRESETS

                # A hub or local base's family is known only where its config is read: the worker
                # resolves the objective for those.
                task_type = PRESETS[self.base_model.removeprefix("random:")]["task_type"]
                object.__setattr__(self, "train", resolve_train(self.train, task_type))
        else:
            object.__setattr__(self, "train", None)
            object.__setattr__(self, "eval", None)  # nothing trained: nothing to evaluate (as `train`, dropped)
        return self

    @model_validator(mode="after")
    def _train_options(self) -> JobSpec:
        train = self.train
        if train is None:
            return self
        if train.optimizer == "adamw_8bit" and self.device in ("cpu", "mps"):
            raise ValueError(f"train.optimizer: adamw_8bit needs CUDA (bitsandbytes) and this job has device: "
                             f"{self.device}; use optimizer: adamw, or device: cuda")
        if train.loraplus_lr_ratio is not None and "lora" not in EXTENSION_KINDS[self.extension].sections:
            raise ValueError(f"train.loraplus_lr_ratio: LoRA+ sets the learning rate of LoRA B matrices, and a "
                             f"{self.extension} job has no LoRA adapter; leave it out, or use extension: lora "
                             "or hybrid")
        return self

    @model_validator(mode="after")
    def _several_gpus(self) -> JobSpec:
        gpus = self.resources.gpus
        if gpus == 1:
            return self
        if self.kind != JobKind.TRAIN:
            raise ValueError(f"resources.gpus: {gpus} GPUs for a create job, which trains nothing; give this job "
                             "resources: {gpus: 1}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"resources.gpus: a job on {gpus} GPUs gets its devices from the worker, and device: "
                             f"{self.device} names one; use device: auto, cuda or cpu")
        return self

    @model_validator(mode="after")
    def _init_without_block(self) -> JobSpec:
        if self.lora is not None and self.layer is not None and self.lora.init in ("pissa", "olora"):
            raise ValueError(f"lora.init: {self.lora.init} rewrites the weights it adapts, and a {self.extension} "
                             "job saves its block's weights too, which would keep the rewrite; use it in lora "
                             "jobs, or lora.init: default or gaussian here")
        return self

    @model_validator(mode="after")
    def _quantized_init(self) -> JobSpec:
        if self.quantize is not None and self.lora is not None and self.lora.init in ("pissa", "olora"):
            raise ValueError(f"lora.init: {self.lora.init} rewrites the base weights, which quantize: "
                             f"{self.quantize} keeps quantised; use lora.init: default or gaussian, or leave "
                             "quantize out")
        return self

    @model_validator(mode="after")
    def _adalora_schedule(self) -> JobSpec:
        """AdaLoRA lays its rank budget out over the job's steps: `total_step` defaults to train.max_steps."""
        spec = self.adalora
        if spec is None or spec.total_step is not None or self.train is None:
            return self  # a create job trains no steps; the worker gives the schedule a nominal length
        if self.train.max_steps is None:
            raise ValueError("adalora.total_step: AdaLoRA needs the number of optimizer steps in advance; set "
                             "train.max_steps (instead of train.epochs) or adalora.total_step")
        if spec.tinit >= self.train.max_steps - spec.tfinal:
            raise ValueError(f"adalora.tinit ({spec.tinit}) + adalora.tfinal ({spec.tfinal}) leave no steps of "
                             f"train.max_steps ({self.train.max_steps}) for reallocating ranks; lower them or "
                             "raise train.max_steps")
        object.__setattr__(self, "adalora", spec.model_copy(update={"total_step": self.train.max_steps}))
        return self

    @property
    def queue_kind(self) -> str:
        """`gpu` when the job must run on a GPU (its device, or `quantize`), `cpu` when it must not,
        `any` otherwise."""
        if self.device.startswith("cuda") or self.quantize is not None:
            return "gpu"
        if self.device == "cpu":
            return "cpu"
        return "any"

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def resolve_train(train: TrainSpec, task_type: str) -> TrainSpec:
    """`train` with its objective resolved for a base of `task_type` and its metrics checked
    against that objective (the defaults filled in). Raises ValueError naming the key."""
    objective = resolve_objective(task_type, train.objective)
    try:
        metrics = check_metrics(train.metrics, objective)
    except ValueError as error:
        raise ValueError(f"train.metrics: {error}") from None
    if objective == train.objective and metrics == train.metrics:
        return train
    resolved = train.model_copy(update={"objective": objective, "metrics": metrics})
    check_watched_metric(resolved)
    return resolved


def check_watched_metric(train: TrainSpec) -> None:
    """Raise ValueError when `early_stopping.metric` is neither eval_loss nor one of `train.metrics` (when
    those are known: given, or resolved for the base's objective)."""
    watched = train.early_stopping
    if watched is None or watched.metric == "eval_loss" or train.metrics is None:
        return
    if watched.metric not in train.metrics:
        computed = ", ".join(["eval_loss", *train.metrics])
        raise ValueError(f"train.early_stopping.metric: {watched.metric!r} is not computed by this job; use one of "
                         f"{computed} (or add it to train.metrics)")


def as_source(value: str | DatasetSource, columns: dict[str, str] | None, split: str) -> DatasetSource:
    """`value` (a path or a source mapping) as a DatasetSource, `columns` under its own and `split` by default."""
    source = DatasetSource(path=value) if isinstance(value, str) else value
    return source.model_copy(update={"columns": {**(columns or {}), **(source.columns or {})},
                                     "split": source.split or split})


#: section name -> its spec: every JobSpec key whose value is a mapping of settings
SECTION_SPECS: dict[str, type[_Spec]] = {
    name: spec for name, field in JobSpec.model_fields.items()
    for spec in get_args(field.annotation) if isinstance(spec, type) and issubclass(spec, _Spec)
}


def _default_text(field) -> str:
    if field.is_required():
        return "required"
    default = field.default
    if default is None:
        return "see text"
    if isinstance(default, StrEnum):
        return f"`{default.value}`"
    if isinstance(default, _Spec):
        return "see section"
    return f"`{default}`"


def batch_reference_markdown() -> str:
    """The batch-file key reference (README), generated from the specs' field help text."""
    sections = [(JobSpec, ""), *((spec, f"{name}.") for name, spec in SECTION_SPECS.items())]
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for model, prefix in sections:
        for name, field in model.model_fields.items():
            lines.append(f"| `{prefix}{field.alias or name}` | {_default_text(field)} | {field.description} |")
    return "\n".join(lines) + "\n"
