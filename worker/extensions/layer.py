"""Added transformer block: a copy of an existing block, inserted into one stack."""

from __future__ import annotations

import copy
import json
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from jobs.spec import LayerSpec
from worker.architectures import Architecture, architecture_for
from worker.errors import ConfigError
from worker.extensions.base import BaseExtension
from worker.models import structural_copy
from worker.stats import adapter_parameters

LAYER_WEIGHTS = "layer.safetensors"
LAYER_CONFIG = "extension.json"


@dataclass(frozen=True)
class LayerPlacement:
    """A resolved LayerSpec: everything needed to re-apply the extension to the base model."""

    family: str
    stack: str
    source: int
    position: int
    init_scale: float
    blocks_before: int


def find_stack(model: torch.nn.Module, arch: Architecture, stack: str) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """Return (parent module, attribute name, ModuleList) of a stack's blocks."""
    for path in arch.stacks[stack]:
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            continue
        blocks = getattr(parent, attr, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return parent, attr, blocks
    raise ConfigError(f"layer.stack: cannot find the {stack} blocks of this {arch.family} model")


def resolve_placement(model: torch.nn.Module, spec: LayerSpec) -> LayerPlacement:
    """Check a LayerSpec against the model; raise ConfigError naming the key and the valid range."""
    arch = architecture_for(model)
    stack = spec.stack or arch.default_stack
    if stack not in arch.stacks:
        raise ConfigError(f"layer.stack: a {arch.family} model has no {stack!r} stack; "
                          f"use one of: {', '.join(arch.stacks)}")
    _, _, blocks = find_stack(_unwrap(model), arch, stack)
    count = len(blocks)
    source = count - 1 if spec.source is None else spec.source
    if not -count <= source < count:
        raise ConfigError(f"layer.source: block {spec.source} does not exist; the {stack} stack has {count} "
                          f"blocks, so use 0..{count - 1} (or -1 for the last)")
    source %= count
    position = count if spec.position == "end" else spec.position
    if not 0 <= position <= count:
        raise ConfigError(f"layer.position: {spec.position} is out of range; the {stack} stack has {count} "
                          f"blocks, so use 0..{count} or 'end'")
    if arch.first_block_owns_position_bias and position == 0:
        raise ConfigError(f"layer.position: 0 is not possible on {arch.family}: the first block owns the relative "
                          "attention bias that every block shares; use a position of 1 or more")
    return LayerPlacement(family=arch.family, stack=stack, source=source, position=position,
                          init_scale=spec.init_scale, blocks_before=count)


def insert_block(model: torch.nn.Module, placement: LayerPlacement) -> torch.nn.Module:
    """Insert a copy of block `source` at `position` in place; return the new block.

    The copy's output projections are scaled by `init_scale`; the config's layer count and every
    block's `layer_idx` (used by the KV cache) are updated so the model saves, reloads and generates.
    """
    arch = architecture_for(model)
    parent, attr, blocks = find_stack(model, arch, placement.stack)
    if len(blocks) != placement.blocks_before:
        raise ConfigError(f"layer: the {placement.stack} stack has {len(blocks)} blocks, the extension was made "
                          f"for {placement.blocks_before}; is this the same base model?")
    # A real copy (fresh tensors), in fp32 before scaling: the new block is trainable and the
    # policy keeps trainable parameters in fp32 even where the base is bf16.
    new_block = copy.deepcopy(blocks[placement.source]).to(torch.float32)
    if arch.first_block_owns_position_bias:
        _drop_position_bias(new_block)
    with torch.no_grad():
        for name in arch.output_projections:
            try:
                projection = new_block.get_submodule(name)
            except AttributeError:
                continue  # e.g. encoder T5 blocks have no cross-attention
            projection.weight.mul_(placement.init_scale)
            if getattr(projection, "bias", None) is not None:
                projection.bias.mul_(placement.init_scale)
    new_blocks = list(blocks)
    new_blocks.insert(placement.position, new_block)
    setattr(parent, attr, torch.nn.ModuleList(new_blocks))
    for index, block in enumerate(new_blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    config = model.config
    setattr(config, arch.layer_count_keys[placement.stack], len(new_blocks))
    stack_config = getattr(parent, "config", None)
    if arch.stack_config_count_key and stack_config is not None and stack_config is not config:
        setattr(stack_config, arch.stack_config_count_key, len(new_blocks))
    if arch.stack_config_count_key and getattr(config, "num_layers", None) != getattr(
            config, "num_decoder_layers", None):
        _use_lazy_generation_cache(model)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == placement.blocks_before:
        layer_types.insert(placement.position, layer_types[placement.source])
    return new_block


def _use_lazy_generation_cache(model: torch.nn.Module) -> None:
    """Make `generate` size its KV cache lazily.

    transformers (5.x) sizes an encoder-decoder model's generation cache from the top config's
    `num_hidden_layers`, which T5 maps to the *encoder* depth; a T5 whose decoder is deeper than
    its encoder then fails in generate() with an IndexError. A cache built without a config grows
    one layer per decoder block, so pass such a cache unless the caller gives one.
    """
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from transformers.generation import utils as generation_utils

    # newer transformers 5.x take the cache as `cache` and warn about `past_key_values`
    name = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"
    generate = type(model).generate
    # A weak reference: the wrapper is kept on the model, and a strong one would make a cycle
    # that keeps a dropped model (and its memory) alive until the next full collection.
    model_ref = weakref.ref(model)

    def generate_with_lazy_cache(*args, **kwargs):
        given = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if not given and kwargs.get("use_cache", True):
            kwargs[name] = EncoderDecoderCache(DynamicCache(), DynamicCache())
        return generate(model_ref(), *args, **kwargs)

    model.generate = generate_with_lazy_cache


def _drop_position_bias(block: torch.nn.Module) -> None:
    for module in block.modules():
        if getattr(module, "has_relative_attention_bias", False):
            module.has_relative_attention_bias = False
            del module.relative_attention_bias


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def block_state_dict(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The block's own weights under plain module names (PEFT wrappers stripped, adapters left out)."""
    adapters = {id(p) for p in adapter_parameters(block)}
    # PEFT keeps a wrapped module's own weights under `base_layer`
    return {name.replace(".base_layer.", "."): tensor.detach().to("cpu").contiguous()
            for name, tensor in block.state_dict(keep_vars=True).items() if id(tensor) not in adapters}


def save_layer(directory: Path, block: torch.nn.Module, placement: LayerPlacement, base_model: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(block_state_dict(block), str(directory / LAYER_WEIGHTS))
    (directory / LAYER_CONFIG).write_text(json.dumps(
        {"extension": "layer", "base_model": base_model, **asdict(placement)}, indent=2) + "\n")
    return directory


def apply_saved_layer(model: torch.nn.Module, directory: Path) -> tuple[torch.nn.Module, LayerPlacement]:
    """Re-apply a saved layer extension to (a copy of) its base model, in place.

    Returns the new block (with its saved weights) and where it was placed.
    """
    info = json.loads((Path(directory) / LAYER_CONFIG).read_text())
    placement = LayerPlacement(**{k: info[k] for k in LayerPlacement.__dataclass_fields__})
    block = insert_block(model, placement)
    state = load_file(str(Path(directory) / LAYER_WEIGHTS))
    block.load_state_dict(state, strict=True)
    return block, placement


def add_block(model: torch.nn.Module, spec: LayerSpec,
              start_from: Path | None = None) -> tuple[torch.nn.Module, LayerPlacement, dict | None]:
    """Add a task's block to `model` in place: a new copy as `spec` places it, or with `start_from`
    (a job directory) the block that job saved, at that job's placement (`spec`'s placement keys
    are then ignored).

    Returns (block, placement, origin): `origin` says what the block was loaded from (None for a
    new copy). Raises ConfigError for `spec.freeze` without `start_from`, or a `start_from` that
    holds no saved block.
    """
    if start_from is None:
        if spec.freeze:
            raise ConfigError("layer.freeze: only a block loaded from another job can stay frozen; set "
                              "layer.from to the job that trained it, or leave layer.freeze out")
        placement = resolve_placement(model, spec)
        return insert_block(model, placement), placement, None
    saved = Path(start_from) / "layer"
    if not (saved / LAYER_CONFIG).is_file():
        raise ConfigError(f"layer.from: job directory {start_from} holds no trained block (no layer/{LAYER_CONFIG}); "
                          "`layer.from` must name a layer or hybrid job")
    block, placement = apply_saved_layer(model, saved)
    return block, placement, {"job_dir": str(start_from), "placement": asdict(placement), "frozen": spec.freeze}


class TransformerLayerExtension(BaseExtension):
    """Adds one transformer block per task; only the new block is trainable.

    With `config.start_from["layer"]` the block is the one that job saved, and it trains on
    (continued training) unless `layer.freeze` keeps it as it is.
    """

    starts_from = ("layer",)

    def __init__(self, base_model, config=None, device_manager=None):
        super().__init__(base_model, config, device_manager)
        #: the tasks whose block stays frozen (`layer.freeze`)
        self.frozen: set[str] = set()

    def create_extended_model(self, task_name: str) -> torch.nn.Module:
        model = structural_copy(self.base_model)
        spec = self.config.section("layer")
        block, placement, origin = add_block(model, spec, self.config.start_from.get("layer"))
        block.requires_grad_(not spec.freeze)
        if spec.freeze:
            self.frozen.add(task_name)
        # fp32 even when frozen: the job saves the block again, and it must be the parent's, bit for bit
        self._place_trainable(block)
        self.placements[task_name] = placement
        if origin is not None:
            self.origins[task_name] = {"layer": origin}
        return self._remember(task_name, model, [block])

    build = create_extended_model

    def parameter_groups(self, task_name: str) -> dict[str, list[torch.nn.Parameter]]:
        """{"layer": the task's block}; empty when the block is frozen (`layer.freeze`): the task
        trains nothing of it, so it counts in `total_params` only."""
        block = self.new_blocks[task_name][0]
        return {"layer": [] if task_name in self.frozen else list(block.parameters())}

    def save(self, task_name: str, directory: Path) -> dict[str, Path]:
        return {"layer": save_layer(Path(directory) / "layer", self.new_blocks[task_name][0],
                                    self.placements[task_name], getattr(self.base_model, "name_or_path", ""))}

    def load(self, task_name: str, directory: Path) -> torch.nn.Module:
        """Rebuild the model that `save(task_name, directory)` saved."""
        model = structural_copy(self.base_model)
        block, self.placements[task_name] = apply_saved_layer(model, Path(directory) / "layer")
        self._place_trainable(block)
        return self._remember(task_name, model, [block])
