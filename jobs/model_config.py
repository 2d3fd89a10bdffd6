"""What a base model's `config.json` says about a job, read without torch: the checks a batch gets
before anything is recorded.

    config = ModelConfigs().find("random:t5-tiny")        # BaseConfig, or None when only the worker can tell
    for key, message in job_problems(spec, config): ...  # one (key, message) per problem

The config comes from a `random:` preset, a local model directory, or the local Hugging Face cache
(a hub id not cached there is left to the worker, which reports it). The module names of each family
are a table here (FAMILIES), kept equal to worker/architectures.py and to the real models by tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jobs.extensions import EXTENSION_KINDS
from jobs.metrics import OBJECTIVES_BY_TASK_TYPE
from jobs.sources import hub_cache

__all__ = ["FAMILIES", "BaseConfig", "Family", "ModelConfigs", "job_problems", "linear_module_names"]

#: hub ids are `name` or `owner/name` (huggingface_hub's repo-id rule)
_HUB_ID = re.compile(r"[\w][\w.-]{0,95}(/[\w][\w.-]{0,95})?")


@dataclass(frozen=True)
class Family:
    """One model family as graftq builds it: its stacks, and the Linear modules PEFT can target."""

    task_type: str
    #: stack -> (dotted path of its blocks from the loaded model's root, config key of its block count)
    stacks: dict[str, tuple[str, str]]
    default_stack: str
    #: (config, stack) -> dotted names, relative to one block, of the block's Linear modules
    block_linears: Callable[[dict[str, Any], str], tuple[str, ...]]
    #: Linear modules outside the blocks: of the model loaded for generation / masked LM, and of the
    #: sequence classifier (`train.objective: classification`)
    head_linears: tuple[str, ...]
    classifier_linears: tuple[str, ...] = ()
    #: config key of the most positions a generated sequence can take; None: relative positions (no
    #: limit), or a family that does not generate
    position_key: str | None = None
    #: the first block owns the relative attention bias every block shares (no new block at position 0)
    first_block_owns_position_bias: bool = False


def _fixed(*names: str) -> Callable[[dict[str, Any], str], tuple[str, ...]]:
    return lambda config, stack: names


def _t5_block(default_proj: str) -> Callable[[dict[str, Any], str], tuple[str, ...]]:
    def linears(config: dict[str, Any], stack: str) -> tuple[str, ...]:
        gated = str(config.get("feed_forward_proj") or default_proj).startswith("gated-")
        feed_forward = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
        attention = tuple(f"layer.0.SelfAttention.{name}" for name in "qkvo")
        if stack == "encoder":
            return (*attention, *(f"layer.1.DenseReluDense.{name}" for name in feed_forward))
        cross = tuple(f"layer.1.EncDecAttention.{name}" for name in "qkvo")
        return (*attention, *cross, *(f"layer.2.DenseReluDense.{name}" for name in feed_forward))

    return linears


def _bart_block(config: dict[str, Any], stack: str) -> tuple[str, ...]:
    attentions = ("self_attn",) if stack == "encoder" else ("self_attn", "encoder_attn")
    return (*(f"{attention}.{name}" for attention in attentions for name in ("k_proj", "v_proj", "q_proj", "out_proj")),
            "fc1", "fc2")


_LLAMA_BLOCK = _fixed("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_BERT_BLOCK = _fixed("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "intermediate.dense", "output.dense")
_LLAMA = Family(task_type="causal", stacks={"decoder": ("model.layers", "num_hidden_layers")},
                default_stack="decoder", block_linears=_LLAMA_BLOCK, head_linears=("lm_head",),
                classifier_linears=("score",), position_key="max_position_embeddings")
_T5 = Family(task_type="seq2seq",
             stacks={"encoder": ("encoder.block", "num_layers"), "decoder": ("decoder.block", "num_decoder_layers")},
             default_stack="encoder", block_linears=_t5_block("relu"), head_linears=("lm_head",),
             first_block_owns_position_bias=True)

#: model_type -> Family, for every model type the worker supports (worker/architectures.py)
FAMILIES: dict[str, Family] = {
    "t5": _T5,
    # mT5 and UMT5 use T5's module names; their feed-forward is gated unless the config says otherwise
    "mt5": replace(_T5, block_linears=_t5_block("gated-gelu")),
    "umt5": replace(_T5, block_linears=_t5_block("gated-gelu")),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "phi3": Family(task_type="causal", stacks={"decoder": ("model.layers", "num_hidden_layers")},
                   default_stack="decoder",
                   block_linears=_fixed("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
                   head_linears=("lm_head",), classifier_linears=("score",), position_key="max_position_embeddings"),
    "gpt2": Family(task_type="causal", stacks={"decoder": ("transformer.h", "n_layer")}, default_stack="decoder",
                   block_linears=_fixed("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
                   head_linears=("lm_head",), classifier_linears=("score",), position_key="n_positions"),
    "bert": Family(task_type="encoder", stacks={"encoder": ("bert.encoder.layer", "num_hidden_layers")},
                   default_stack="encoder", block_linears=_BERT_BLOCK,
                   head_linears=("cls.predictions.transform.dense", "cls.predictions.decoder"),
                   classifier_linears=("bert.pooler.dense", "classifier")),
    "roberta": Family(task_type="encoder", stacks={"encoder": ("roberta.encoder.layer", "num_hidden_layers")},
                      default_stack="encoder", block_linears=_BERT_BLOCK,
                      head_linears=("lm_head.dense", "lm_head.decoder"),
                      classifier_linears=("classifier.dense", "classifier.out_proj")),
    "bart": Family(task_type="seq2seq",
                   stacks={"encoder": ("model.encoder.layers", "encoder_layers"),
                           "decoder": ("model.decoder.layers", "decoder_layers")},
                   default_stack="encoder", block_linears=_bart_block, head_linears=("lm_head",),
                   position_key="max_position_embeddings"),
}


@dataclass(frozen=True)
class BaseConfig:
    """A base model's config as read from its `config.json` (or its preset)."""

    name: str
    config: dict[str, Any]
    #: objective -> every dotted suffix of every Linear module name (a grid checks the same model many times)
    _suffixes: dict[str | None, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def family(self) -> Family | None:
        return FAMILIES.get(self.model_type)

    def block_count(self, stack: str) -> int | None:
        """The number of blocks of `stack`, or None when the config does not say."""
        family = self.family
        if family is None or stack not in family.stacks:
            return None
        key = family.stacks[stack][1]
        count = self.config.get(key)
        if count is None and key == "num_decoder_layers":  # T5's config: the decoder defaults to the encoder's depth
            count = self.config.get("num_layers")
        return count if isinstance(count, int) and not isinstance(count, bool) else None

    def position_limit(self) -> int | None:
        """The most positions one sequence can take, or None (relative positions, or not in the config)."""
        family = self.family
        if family is None or family.position_key is None:
            return None
        limit = self.config.get(family.position_key)
        if not isinstance(limit, int) or isinstance(limit, bool):
            return None
        return limit


def linear_module_names(base: BaseConfig, objective: str | None) -> list[str]:
    """The dotted names of the Linear (and GPT-2 Conv1D) modules of `base` as the worker loads it for
    `objective` (the sequence classifier for `classification`), as PEFT's target matching sees them.
    Empty when the family is unknown or the config lacks a block count."""
    family = base.family
    if family is None:
        return []
    classifier = objective == "classification"
    names = []
    for stack, (path, _) in family.stacks.items():
        count = base.block_count(stack)
        if count is None:
            return []
        names += [f"{path}.{index}.{name}" for index in range(count) for name in family.block_linears(base.config, stack)]
    return names + list(family.classifier_linears if classifier else family.head_linears)


def _suffixes(base: BaseConfig, objective: str | None) -> frozenset[str]:
    """What a target module name may be, by PEFT's rule for a list of target_modules: a full module name,
    or the part of one after a dot."""
    if objective not in base._suffixes:
        names = linear_module_names(base, objective)
        base._suffixes[objective] = frozenset(".".join(parts[start:]) for parts in (name.split(".") for name in names)
                                              for start in range(len(parts)))
    return base._suffixes[objective]


def _target_problems(spec: Any, base: BaseConfig, objective: str | None) -> Iterator[tuple[str, str]]:
    suffixes = _suffixes(base, objective)
    if not suffixes:
        return
    for section in EXTENSION_KINDS[spec.extension].sections:
        settings = getattr(spec, section, None)
        targets = getattr(settings, "target_modules", None)
        if not targets or getattr(settings, "from_", None) is not None:
            continue  # the family's default, or the settings of the adapter it starts from
        missing = [target for target in targets if target not in suffixes]
        if not missing:
            continue
        shorts = sorted(suffix for suffix in suffixes if "." not in suffix)
        yield (f"{section}.target_modules",
               f"no Linear module named {', '.join(map(repr, missing))} in {base.name} ({base.model_type}); "
               f"its Linear modules are: {', '.join(shorts)}. Fix the name(s), or leave target_modules "
               "out for the family's default")


def _layer_problems(spec: Any, base: BaseConfig) -> Iterator[tuple[str, str]]:
    layer, family = spec.layer, base.family
    if layer is None or family is None or layer.from_ is not None:
        return  # `layer.from` keeps the placement of the job it builds on
    stack = layer.stack or family.default_stack
    if stack not in family.stacks:
        yield "layer.stack", (f"{base.name} ({base.model_type}) has no {stack} stack; use "
                              f"{' or '.join(family.stacks)}")
        return
    count = base.block_count(stack)
    if count is None:
        return
    where = f"the {stack} stack of {base.name} has {count} blocks"
    source = layer.source
    if layer.expand is not None:
        if layer.expand.every > count:
            yield "layer.expand.every", f"{layer.expand.every} is more than {count} ({where}); use 1..{count}"
            return
        key, positions, source = "layer.expand", list(range(layer.expand.every, count + 1, layer.expand.every)), "previous"
    elif layer.positions is not None:
        key, positions = "layer.positions", sorted(layer.positions)
        beyond = [position for position in positions if position > count]
        if beyond:
            yield key, (f"{', '.join(map(str, beyond))} out of range: {where}, so use indices 0..{count} "
                        f"({count} = after the last block)")
    else:
        key = "layer.position"
        positions = [count if layer.position == "end" else layer.position]
        if positions[0] > count:
            yield key, f"{layer.position} is out of range: {where}, so use 0..{count} or end"
    if family.first_block_owns_position_bias and positions[0] == 0:
        yield key, (f"0 is not possible on {base.model_type}: its first block owns the relative attention bias "
                    "that every block shares; use a position of 1 or more")
    if source == "previous":
        if positions[0] == 0 and key != "layer.expand":
            yield "layer.source", (f"previous copies the block before each new block, and {key} 0 has none; use "
                                   "positions of 1 or more, or a block index as source")
    elif source is not None and not -count <= source < count:
        yield "layer.source", (f"block {source} does not exist: {where}, so use 0..{count - 1} (or -1 for the "
                               "last, or previous)")


def _generation_problems(spec: Any, base: BaseConfig, objective: str | None) -> Iterator[tuple[str, str]]:
    train = spec.train
    if train is None or train.max_new_tokens is None or objective == "classification":
        return
    limit = base.position_limit()
    if limit is not None and train.max_new_tokens > limit:
        yield "train.max_new_tokens", (f"{train.max_new_tokens} is more than the {limit} positions {base.name} "
                                       f"({base.model_type}) was built for; use at most {limit}")


def _objective(spec: Any, family: Family) -> str | None:
    """The objective the worker resolves for the job: its own, else the family's default (a create job
    builds the model a train job would)."""
    objective = spec.train.objective if spec.train is not None else None
    allowed = OBJECTIVES_BY_TASK_TYPE.get(family.task_type, ())
    return objective if objective is not None else (allowed[0] if allowed else None)


def job_problems(spec: Any, base: BaseConfig) -> list[tuple[str, str]]:
    """(key, message) for each thing in the validated JobSpec `spec` that its base model's config rules
    out: target modules it does not have, block indices beyond its stacks, a generation length beyond
    its positions. Empty for a model family graftq has no table for (the worker reports it)."""
    family = base.family
    if family is None:
        return []
    objective = _objective(spec, family)
    return [*_target_problems(spec, base, objective), *_layer_problems(spec, base),
            *_generation_problems(spec, base, objective)]


class ModelConfigs:
    """The base models of a batch: each config read once (a grid repeats the same few models)."""

    def __init__(self) -> None:
        self._found: dict[str, tuple[BaseConfig | None, str | None]] = {}

    def find(self, name: str) -> tuple[BaseConfig | None, str | None]:
        """(config, None); (None, why) when `name` names a local model directory that is missing or is not
        a model; (None, None) when the config is not here to read (a hub id outside the local cache)."""
        if name not in self._found:
            self._found[name] = _find(name)
        return self._found[name]


def _read(name: str, path: Path) -> tuple[BaseConfig | None, str | None]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return None, f"cannot read {str(path)!r}: {error}; save the model again with save_pretrained"
    if not isinstance(config, dict):
        return None, f"{str(path)!r} is not a model config (a JSON object); save the model again with save_pretrained"
    return BaseConfig(name, config), None


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: hub ids are `name` or `owner/name`."""
    return name.startswith(("/", ".", "~")) or "\\" in name or not _HUB_ID.fullmatch(name)


def _find(name: str) -> tuple[BaseConfig | None, str | None]:
    if name.startswith("random:"):
        from jobs.presets import PRESETS

        preset = PRESETS.get(name.removeprefix("random:"))
        return (BaseConfig(name, dict(preset["config"])), None) if preset else (None, None)
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            return None, (f"the model directory {name!r} has no config.json, so it is not a saved model; point "
                          "base_model at a directory written by save_pretrained")
        return _read(name, config)
    if path.exists():
        return None, f"{name!r} is a file; base_model takes a model directory, a hub id or random:<preset>"
    if _looks_local(name):
        return None, (f"the local model directory {name!r} does not exist (relative paths are read from the "
                      "directory graftq runs in); fix the path, or give a hub id or random:<preset> "
                      "(examples/quickstart.yaml's is made by `python scripts/pretrain_demo_base.py`)")
    config = _cached_hub_config(name)
    return _read(name, config) if config is not None else (None, None)


def _cached_hub_config(name: str) -> Path | None:
    """The config.json of hub model `name` in the local Hugging Face cache (its `main` snapshot when
    recorded, else the newest), or None."""
    repo = hub_cache() / f"models--{name.replace('/', '--')}"
    main = repo / "refs" / "main"
    snapshots = []
    if main.is_file():
        snapshots.append(repo / "snapshots" / main.read_text().strip())
    snapshots += sorted((path for path in (repo / "snapshots").glob("*") if path.is_dir()),
                        key=lambda path: path.stat().st_mtime, reverse=True)
    return next((snapshot / "config.json" for snapshot in snapshots if (snapshot / "config.json").is_file()), None)
