"""Hybrid: added blocks first, then LoRA on the extended model (the new blocks too).

Trainable = the task's LoRA adapter + the new blocks' own weights (the adapter only when the
blocks, loaded from another job, are kept frozen with `layer.freeze`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from worker.errors import ConfigError
from worker.extensions.base import BaseExtension
from worker.extensions.layer import LayerPlacement, add_blocks, apply_saved_layer, save_layer
from worker.extensions.lora import adapter_name_for, add_task_adapter, save_adapter
from worker.models import structural_copy
from worker.stats import adapter_parameters, own_parameters


def _attach(model: PeftModel, blocks: list[torch.nn.Module], placements: list[LayerPlacement]) -> None:
    """Keep the added blocks and their placements on the model, so that another task (or another
    extension) can share them. Plain attributes: assigning a Module through nn.Module.__setattr__
    would register a block a second time in the module tree (and in state dicts)."""
    object.__setattr__(model, "graftq_new_blocks", list(blocks))
    object.__setattr__(model, "graftq_placements", list(placements))


def _train_block_weights(blocks: list[torch.nn.Module], trains: bool = True) -> None:
    """PEFT froze everything but the adapters; the new blocks' own weights train too, unless frozen."""
    for block in blocks:
        for param in own_parameters(block):
            param.requires_grad_(trains)


class HybridExtension(BaseExtension):
    """The Python API and the `hybrid` kind.

    With `config.start_from["layer"]` the block is the one that job saved (at its placement); it
    trains on unless `layer.freeze` keeps it as it is. `config.start_from["lora"]` (the same job)
    starts the adapter from that job's adapter, with its settings.
    """

    starts_from = ("layer", "lora")

    def __init__(self, base_model, config=None, device_manager=None):
        super().__init__(base_model, config, device_manager)
        lora_from = self.config.start_from.get("lora")
        if lora_from is not None and lora_from != self.config.start_from.get("layer"):
            raise ConfigError("lora.from: a hybrid job's adapter covers its block too, so it can only start from "
                              "the job its block comes from: set layer.from to the same job as lora.from")
        #: the model whose added blocks every `use_shared_layer` task uses
        self.shared_model: PeftModel | None = None
        #: the tasks whose block stays frozen (`layer.freeze`)
        self.frozen: set[str] = set()

    def _extend(self, task_name: str) -> tuple[torch.nn.Module, list[torch.nn.Module], list[LayerPlacement]]:
        model = structural_copy(self.base_model)
        blocks, placements, origin = add_blocks(model, self.config.section("layer"),
                                                self.config.start_from.get("layer"))
        for block in blocks:
            # fp32 even when frozen: the job saves the block again, and it must be the parent's, bit for bit
            self._place_trainable(block)
        if origin is not None:
            self.origins.setdefault(task_name, {})["layer"] = origin
        return model, blocks, placements

    def create_hybrid_model(self, task_name: str, use_shared_layer: bool = False,
                            shared_model: PeftModel | None = None) -> PeftModel:
        """Build the hybrid model of `task_name`.

        With `use_shared_layer`, every task's hybrid uses the same added blocks (those of `shared_model`,
        a hybrid model built by a HybridExtension, or else of the first shared task) and the tasks
        differ only in their LoRA adapters. Raises ValueError for a task built already, or a
        `shared_model` that is not a hybrid model.
        """
        if task_name in self.models:
            raise ValueError(f"task {task_name!r} already has a hybrid model")
        if use_shared_layer and (shared_model or self.shared_model) is not None:
            model = shared_model or self.shared_model
            if not hasattr(model, "graftq_new_blocks"):
                raise ValueError("shared_model must be a model returned by create_hybrid_model")
            add_task_adapter(self, model, task_name)
        else:
            extended, blocks, placements = self._extend(task_name)
            model = add_task_adapter(self, extended, task_name)
            _attach(model, blocks, placements)
        if use_shared_layer:
            self.shared_model = model
        if self.config.section("layer").freeze:
            self.frozen.add(task_name)
        _train_block_weights(model.graftq_new_blocks, trains=task_name not in self.frozen)
        self.placements[task_name] = model.graftq_placements
        return self._remember(task_name, model, model.graftq_new_blocks)

    build = create_hybrid_model

    def switch(self, task_name: str) -> PeftModel:
        model = super().switch(task_name)
        model.set_adapter(adapter_name_for(task_name))
        _train_block_weights(self.new_blocks[task_name], trains=task_name not in self.frozen)
        return model

    def parameter_groups(self, task_name: str) -> dict[str, list[torch.nn.Parameter]]:
        """{"lora": the task's own adapter (not other tasks' adapters on a shared model), "layer": the
        block's own weights}; "layer" is empty when the block is frozen (`layer.freeze`): the task
        trains only its adapter, and the block counts in `total_params` only."""
        model = self.model_for(task_name)
        blocks = self.new_blocks[task_name]
        return {"lora": adapter_parameters(model, adapter_name_for(task_name)),
                "layer": [] if task_name in self.frozen else [p for block in blocks for p in own_parameters(block)]}

    def save(self, task_name: str, directory: Path) -> dict[str, Path]:
        directory = Path(directory)
        model = self.model_for(task_name)
        return {"adapter": save_adapter(model, directory / "adapter", adapter_name=adapter_name_for(task_name)),
                "layer": save_layer(directory / "layer", self.new_blocks[task_name], self.placements[task_name],
                                    getattr(self.base_model, "name_or_path", ""))}

    def load(self, task_name: str, directory: Path) -> PeftModel:
        """Rebuild the model that `save(task_name, directory)` saved."""
        directory = Path(directory)
        extended = structural_copy(self.base_model)
        blocks, placements = apply_saved_layer(extended, directory / "layer")
        for block in blocks:
            self._place_trainable(block)
        model = PeftModel.from_pretrained(extended, str(directory / "adapter"),
                                          adapter_name=adapter_name_for(task_name))
        _attach(model, blocks, placements)
        self.placements[task_name] = placements
        return self._remember(task_name, model, blocks)
