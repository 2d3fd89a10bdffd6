"""Added transformer blocks: copies of existing blocks, inserted into one stack (one block, several at
given positions, or LLaMA Pro's interleaved expansion)."""

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


def resolve_placements(model: torch.nn.Module, spec: LayerSpec) -> list[LayerPlacement]:
    """Check a LayerSpec against the model; raise ConfigError naming the key and the valid range.

    Returns one placement per new block, in the order they are inserted: each placement's
    `source`, `position` and `blocks_before` count the blocks inserted before it, so that
    applying them one after another (`insert_block`) rebuilds the model.
    """
    arch = architecture_for(model)
    stack = spec.stack or arch.default_stack
    if stack not in arch.stacks:
        raise ConfigError(f"layer.stack: a {arch.family} model has no {stack!r} stack; "
                          f"use one of: {', '.join(arch.stacks)}")
    _, _, blocks = find_stack(_unwrap(model), arch, stack)
    count = len(blocks)
    source = spec.source
    if spec.expand is not None:
        every = spec.expand.every
        if every > count:
            raise ConfigError(f"layer.expand.every: {every} is more than the {count} blocks of the {stack} stack; "
                              f"use 1..{count}")
        key, positions, source = "layer.expand", list(range(every, count + 1, every)), "previous"
    elif spec.positions is not None:
        key, positions = "layer.positions", sorted(spec.positions)
        for position in positions:
            if position > count:
                raise ConfigError(f"layer.positions: {position} is out of range; the {stack} stack has {count} "
                                  f"blocks, so use indices 0..{count} ({count} = after the last block)")
    else:
        key = "layer.position"
        position = count if spec.position == "end" else spec.position
        if not 0 <= position <= count:
            raise ConfigError(f"layer.position: {spec.position} is out of range; the {stack} stack has {count} "
                              f"blocks, so use 0..{count} or 'end'")
        positions = [position]
    if arch.first_block_owns_position_bias and positions[0] == 0:
        raise ConfigError(f"{key}: 0 is not possible on {arch.family}: the first block owns the relative "
                          "attention bias that every block shares; use a position of 1 or more")
    if source == "previous":
        if positions[0] == 0:
            raise ConfigError(f"layer.source: previous copies the block before each new block, and {key} 0 has "
                              "none; use positions of 1 or more, or a block index as source")
        sources = [position - 1 for position in positions]
    else:
        index = count - 1 if source is None else source
        if not -count <= index < count:
            raise ConfigError(f"layer.source: block {source} does not exist; the {stack} stack has {count} "
                              f"blocks, so use 0..{count - 1} (or -1 for the last, or previous)")
        sources = [index % count] * len(positions)
    placements = []
    for inserted, (position, source_index) in enumerate(zip(positions, sources)):
        # earlier insertions (all at or before `position`) shift this one and, if at or before it, its source
        shift = sum(1 for earlier in positions[:inserted] if earlier <= source_index)
        placements.append(LayerPlacement(family=arch.family, stack=stack, source=source_index + shift,
                                          position=position + inserted, init_scale=spec.init_scale,
                                          blocks_before=count + inserted))
    return placements


def resolve_placement(model: torch.nn.Module, spec: LayerSpec) -> LayerPlacement:
    """The placement of a one-block LayerSpec (see `resolve_placements`)."""
    placements = resolve_placements(model, spec)
    if len(placements) != 1:
        raise ConfigError(f"layer: this spec adds {len(placements)} blocks, not one")
    return placements[0]


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
    if getattr(config, "is_encoder_decoder", False) and len(
            {getattr(config, key, None) for key in arch.layer_count_keys.values()}) > 1:
        _use_lazy_generation_cache(model)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == placement.blocks_before:
        layer_types.insert(placement.position, layer_types[placement.source])
    if getattr(config, "is_encoder_decoder", False):
        from worker.export import sync_layer_counts

        sync_layer_counts(model)  # so that the model saved with save_pretrained generates when reloaded
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


def save_layer(directory: Path, blocks: list[torch.nn.Module], placements: list[LayerPlacement],
               base_model: str) -> Path:
    """Write the added blocks and their placements: one block keeps the flat layout (weights under
    their block-relative names, the placement's keys at the top of extension.json); several go
    under `blocks.<k>.` in one file, with a `blocks` list of placements in insertion order."""
    directory.mkdir(parents=True, exist_ok=True)
    if len(blocks) == 1:
        state = block_state_dict(blocks[0])
        info = {"extension": "layer", "base_model": base_model, **asdict(placements[0])}
    else:
        state = {f"blocks.{k}.{name}": tensor for k, block in enumerate(blocks)
                 for name, tensor in block_state_dict(block).items()}
        info = {"extension": "layer", "base_model": base_model,
                "blocks": [asdict(placement) for placement in placements]}
    save_file(state, str(directory / LAYER_WEIGHTS))
    (directory / LAYER_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    return directory


def apply_saved_layer(model: torch.nn.Module, directory: Path) -> tuple[list[torch.nn.Module], list[LayerPlacement]]:
    """Re-apply a saved layer extension (one block or several) to (a copy of) its base model, in place.

    Returns the new blocks (with their saved weights) and where they were placed.
    """
    info = json.loads((Path(directory) / LAYER_CONFIG).read_text())
    fields = LayerPlacement.__dataclass_fields__
    placements = [LayerPlacement(**{k: item[k] for k in fields}) for item in info.get("blocks", [info])]
    state = load_file(str(Path(directory) / LAYER_WEIGHTS))
    blocks = []
    for k, placement in enumerate(placements):
        block = insert_block(model, placement)
        if "blocks" in info:
            prefix = f"blocks.{k}."
            own = {name.removeprefix(prefix): tensor for name, tensor in state.items() if name.startswith(prefix)}
        else:
            own = state
        block.load_state_dict(own, strict=True)
        blocks.append(block)
    return blocks, placements


def add_blocks(model: torch.nn.Module, spec: LayerSpec, start_from: Path | None = None
               ) -> tuple[list[torch.nn.Module], list[LayerPlacement], dict | None]:
    """Add a task's blocks to `model` in place: new copies as `spec` places them, or with `start_from`
    (a job directory) the blocks that job saved, at that job's placements (`spec`'s placement keys
    are then ignored).

    Returns (blocks, placements, origin): `origin` says what the blocks were loaded from (None for new
    copies). Raises ConfigError for `spec.freeze` without `start_from`, or a `start_from` that holds
    no saved block.
    """
    if start_from is None:
        if spec.freeze:
            raise ConfigError("layer.freeze: only a block loaded from another job can stay frozen; set "
                              "layer.from to the job that trained it, or leave layer.freeze out")
        placements = resolve_placements(model, spec)
        return [insert_block(model, placement) for placement in placements], placements, None
    saved = Path(start_from) / "layer"
    if not (saved / LAYER_CONFIG).is_file():
        raise ConfigError(f"layer.from: job directory {start_from} holds no trained block (no layer/{LAYER_CONFIG}); "
                          "`layer.from` must name a layer or hybrid job")
    blocks, placements = apply_saved_layer(model, saved)
    origin = {"job_dir": str(start_from), "frozen": spec.freeze}
    if len(placements) == 1:
        origin["placement"] = asdict(placements[0])
    else:
        origin["placements"] = [asdict(placement) for placement in placements]
    return blocks, placements, origin


def add_block(model: torch.nn.Module, spec: LayerSpec,
              start_from: Path | None = None) -> tuple[torch.nn.Module, LayerPlacement, dict | None]:
    """`add_blocks` for a spec (or a parent job) with exactly one block: (block, placement, origin)."""
    blocks, placements, origin = add_blocks(model, spec, start_from)
    if len(blocks) != 1:
        raise ConfigError(f"layer: {len(blocks)} blocks were added where one was expected")
    return blocks[0], placements[0], origin


class TransformerLayerExtension(BaseExtension):
    """Adds transformer blocks (one, or several) per task; only the new blocks are trainable.

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
        blocks, placements, origin = add_blocks(model, spec, self.config.start_from.get("layer"))
        for block in blocks:
            block.requires_grad_(not spec.freeze)
            # fp32 even when frozen: the job saves the block again, and it must be the parent's, bit for bit
            self._place_trainable(block)
        if spec.freeze:
            self.frozen.add(task_name)
        self.placements[task_name] = placements
        if origin is not None:
            self.origins[task_name] = {"layer": origin}
        return self._remember(task_name, model, blocks)

    build = create_extended_model

    def parameter_groups(self, task_name: str) -> dict[str, list[torch.nn.Parameter]]:
        """{"layer": the task's blocks}; empty when the blocks are frozen (`layer.freeze`): the task
        trains nothing of them, so they count in `total_params` only."""
        blocks = self.new_blocks[task_name]
        return {"layer": [] if task_name in self.frozen else [p for block in blocks for p in block.parameters()]}

    def save(self, task_name: str, directory: Path) -> dict[str, Path]:
        return {"layer": save_layer(Path(directory) / "layer", self.new_blocks[task_name], self.placements[task_name],
                                    getattr(self.base_model, "name_or_path", ""))}

    def load(self, task_name: str, directory: Path) -> torch.nn.Module:
        """Rebuild the model that `save(task_name, directory)` saved."""
        model = structural_copy(self.base_model)
        blocks, self.placements[task_name] = apply_saved_layer(model, Path(directory) / "layer")
        for block in blocks:
            self._place_trainable(block)
        return self._remember(task_name, model, blocks)
