"""Hybrid: an added block first, then LoRA on the extended model (the new block too).

Trainable = the task's LoRA adapter + the new block's own weights (the adapter only when the
block, loaded from another job, is kept frozen with `layer.freeze`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from worker.errors import ConfigError
from worker.extensions.base import BaseExtension
from worker.extensions.layer import LayerPlacement, add_block, apply_saved_layer, save_layer
from worker.extensions.lora import adapter_name_for, add_task_adapter, save_adapter
from worker.models import structural_copy
from worker.stats import adapter_parameters, own_parameters


def _attach(model: PeftModel, block: torch.nn.Module, placement: LayerPlacement) -> None:
    """Keep the added block and its placement on the model, so that another task (or another
    extension) can share it. Plain attributes: assigning a Module through nn.Module.__setattr__
    would register the block a second time in the module tree (and in state dicts)."""
    object.__setattr__(model, "graftq_new_block", block)
    object.__setattr__(model, "graftq_placement", placement)


def _train_block_weights(block: torch.nn.Module, trains: bool = True) -> None:
    """PEFT froze everything but the adapters; the new block's own weights train too, unless frozen."""
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
        #: the model whose one added block every `use_shared_layer` task uses
        self.shared_model: PeftModel | None = None
        #: the tasks whose block stays frozen (`layer.freeze`)
        self.frozen: set[str] = set()

    def _extend(self, task_name: str) -> tuple[torch.nn.Module, torch.nn.Module, LayerPlacement]:
        model = structural_copy(self.base_model)
        block, placement, origin = add_block(model, self.config.section("layer"), self.config.start_from.get("layer"))
        # fp32 even when frozen: the job saves the block again, and it must be the parent's, bit for bit
        self._place_trainable(block)
        if origin is not None:
            self.origins.setdefault(task_name, {})["layer"] = origin
        return model, block, placement

    def create_hybrid_model(self, task_name: str, use_shared_layer: bool = False,
                            shared_model: PeftModel | None = None) -> PeftModel:
        """Build the hybrid model of `task_name`.

        With `use_shared_layer`, every task's hybrid uses one added block (that of `shared_model`,
        a hybrid model built by a HybridExtension, or else of the first shared task) and the tasks
        differ only in their LoRA adapters. Raises ValueError for a task built already, or a
        `shared_model` that is not a hybrid model.
        """
        if task_name in self.models:
            raise ValueError(f"task {task_name!r} already has a hybrid model")
        if use_shared_layer and (shared_model or self.shared_model) is not None:
            model = shared_model or self.shared_model
            if not hasattr(model, "graftq_new_block"):
                raise ValueError("shared_model must be a model returned by create_hybrid_model")
            add_task_adapter(self, model, task_name)
        else:
            extended, block, placement = self._extend(task_name)
            model = add_task_adapter(self, extended, task_name)
            _attach(model, block, placement)
        if use_shared_layer:
            self.shared_model = model
        if self.config.section("layer").freeze:
            self.frozen.add(task_name)
        _train_block_weights(model.graftq_new_block, trains=task_name not in self.frozen)
        self.placements[task_name] = model.graftq_placement
        return self._remember(task_name, model, [model.graftq_new_block])

    build = create_hybrid_model

    def switch(self, task_name: str) -> PeftModel:
        model = super().switch(task_name)
        model.set_adapter(adapter_name_for(task_name))
        _train_block_weights(self.new_blocks[task_name][0], trains=task_name not in self.frozen)
        return model

    def parameter_groups(self, task_name: str) -> dict[str, list[torch.nn.Parameter]]:
        """{"lora": the task's own adapter (not other tasks' adapters on a shared model), "layer": the
        block's own weights}; "layer" is empty when the block is frozen (`layer.freeze`): the task
        trains only its adapter, and the block counts in `total_params` only."""
        model = self.model_for(task_name)
        block = self.new_blocks[task_name][0]
        return {"lora": adapter_parameters(model, adapter_name_for(task_name)),
                "layer": [] if task_name in self.frozen else own_parameters(block)}

    def save(self, task_name: str, directory: Path) -> dict[str, Path]:
        directory = Path(directory)
        model = self.model_for(task_name)
        return {"adapter": save_adapter(model, directory / "adapter", adapter_name=adapter_name_for(task_name)),
                "layer": save_layer(directory / "layer", self.new_blocks[task_name][0], self.placements[task_name],
                                    getattr(self.base_model, "name_or_path", ""))}

    def load(self, task_name: str, directory: Path) -> PeftModel:
        """Rebuild the model that `save(task_name, directory)` saved."""
        directory = Path(directory)
        extended = structural_copy(self.base_model)
        block, placement = apply_saved_layer(extended, directory / "layer")
        self._place_trainable(block)
        model = PeftModel.from_pretrained(extended, str(directory / "adapter"),
                                          adapter_name=adapter_name_for(task_name))
        _attach(model, block, placement)
        self.placements[task_name] = placement
        return self._remember(task_name, model, [block])
