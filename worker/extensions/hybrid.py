"""Hybrid: an added block first, then LoRA on the extended model (the new block too).

Trainable = the task's LoRA adapter + the new block's own weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from worker.extensions.base import BaseExtension
from worker.extensions.layer import (
    LayerPlacement,
    apply_saved_layer,
    insert_block,
    resolve_placement,
    save_layer,
)
from worker.extensions.lora import adapter_name_for, add_lora, save_adapter
from worker.models import structural_copy
from worker.stats import adapter_parameters, own_parameters


def _attach(model: PeftModel, block: torch.nn.Module, placement: LayerPlacement) -> None:
    """Keep the added block and its placement on the model, so that another task (or another
    extension) can share it. Plain attributes: assigning a Module through nn.Module.__setattr__
    would register the block a second time in the module tree (and in state dicts)."""
    object.__setattr__(model, "graftq_new_block", block)
    object.__setattr__(model, "graftq_placement", placement)


def _train_block_weights(block: torch.nn.Module) -> None:
    """PEFT froze everything but the adapters; the new block's own weights train too."""
    for param in own_parameters(block):
        param.requires_grad_(True)


class HybridExtension(BaseExtension):
    def __init__(self, base_model, config=None, device_manager=None):
        super().__init__(base_model, config, device_manager)
        #: the model whose one added block every `use_shared_layer` task uses
        self.shared_model: PeftModel | None = None

    def _extend(self) -> tuple[torch.nn.Module, torch.nn.Module, LayerPlacement]:
        model = structural_copy(self.base_model)
        placement = resolve_placement(model, self.config.section("layer"))
        block = insert_block(model, placement)
        self._place_trainable(block)
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
        adapter = adapter_name_for(task_name)
        if use_shared_layer and (shared_model or self.shared_model) is not None:
            model = shared_model or self.shared_model
            if not hasattr(model, "graftq_new_block"):
                raise ValueError("shared_model must be a model returned by create_hybrid_model")
            add_lora(model, self.config.section("lora"), self.arch, adapter_name=adapter)
        else:
            extended, block, placement = self._extend()
            model = add_lora(extended, self.config.section("lora"), self.arch, adapter_name=adapter)
            _attach(model, block, placement)
        if use_shared_layer:
            self.shared_model = model
        _train_block_weights(model.graftq_new_block)
        self.placements[task_name] = model.graftq_placement
        return self._remember(task_name, model, [model.graftq_new_block])

    build = create_hybrid_model

    def switch(self, task_name: str) -> PeftModel:
        model = super().switch(task_name)
        model.set_adapter(adapter_name_for(task_name))
        _train_block_weights(self.new_blocks[task_name][0])
        return model

    def parameter_groups(self, task_name: str) -> dict[str, list[torch.nn.Parameter]]:
        model = self.model_for(task_name)
        return {"lora": adapter_parameters(model, adapter_name_for(task_name)),
                "layer": own_parameters(self.new_blocks[task_name][0])}

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
