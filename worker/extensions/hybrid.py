"""Hybrid: an added block first, then LoRA on the extended model (the new block too).

Trainable = every LoRA parameter + the new block's own weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

from worker.extensions.base import BaseExtension
from worker.extensions.layer import (
    LAYER_CONFIG,
    LayerPlacement,
    apply_saved_layer,
    insert_block,
    resolve_placement,
    save_layer,
)
from worker.extensions.lora import adapter_name_for, add_lora, save_adapter
from worker.models import structural_copy


class HybridExtension(BaseExtension):
    kind = "hybrid"

    def __init__(self, base_model, config=None, device_manager=None):
        super().__init__(base_model, config, device_manager)
        self.placements: dict[str, LayerPlacement] = {}
        self.shared_model: PeftModel | None = None
        self._shared_block: torch.nn.Module | None = None
        self._shared_placement: LayerPlacement | None = None

    def _extend(self) -> tuple[torch.nn.Module, torch.nn.Module, LayerPlacement]:
        model = structural_copy(self.base_model)
        placement = resolve_placement(model, self.config.layer)
        block = insert_block(model, placement)
        self._place_trainable(block)
        return model, block, placement

    def create_hybrid_model(self, task_name: str, use_shared_layer: bool = False,
                            shared_model: PeftModel | None = None) -> PeftModel:
        """Build the hybrid model of `task_name`.

        With `use_shared_layer`, every task's hybrid uses one added block (that of `shared_model`,
        or of the first shared task) and the tasks differ only in their LoRA adapters.
        """
        if task_name in self.models:
            raise ValueError(f"task {task_name!r} already has a hybrid model")
        if use_shared_layer:
            if shared_model is not None and shared_model is not self.shared_model:
                self.shared_model = shared_model
                self._shared_block = next(iter(self.new_blocks.values()))[0] if self.new_blocks else None
            if self.shared_model is None:
                model, block, placement = self._extend()
                self._shared_block, self._shared_placement = block, placement
                self.shared_model = add_lora(model, self.config.lora, self.arch, adapter_name=adapter_name_for(task_name))
            else:
                add_lora(self.shared_model, self.config.lora, self.arch, adapter_name=adapter_name_for(task_name))
            model, block, placement = self.shared_model, self._shared_block, self._shared_placement
        else:
            extended, block, placement = self._extend()
            model = add_lora(extended, self.config.lora, self.arch, adapter_name=adapter_name_for(task_name))
        # PEFT froze everything but the adapters; the new block's own weights train too.
        for name, param in block.named_parameters():
            if "lora_" not in name:
                param.requires_grad_(True)
        self.placements[task_name] = placement
        return self._remember(task_name, model, [block])

    def switch(self, task_name: str) -> PeftModel:
        model = super().switch(task_name)
        model.set_adapter(adapter_name_for(task_name))
        for name, param in self.new_blocks[task_name][0].named_parameters():
            if "lora_" not in name:
                param.requires_grad_(True)
        return model

    def save(self, task_name: str, directory: Path) -> tuple[Path, Path]:
        directory = Path(directory)
        model = self.model_for(task_name)
        adapter = save_adapter(model, directory / "adapter", adapter_name=adapter_name_for(task_name))
        layer = save_layer(directory / "layer", self.new_blocks[task_name][0], self.placements[task_name],
                           getattr(self.base_model, "name_or_path", ""))
        return adapter, layer

    def load(self, task_name: str, directory: Path) -> PeftModel:
        directory = Path(directory)
        extended = structural_copy(self.base_model)
        block = apply_saved_layer(extended, directory / "layer")
        self._place_trainable(block)
        model = PeftModel.from_pretrained(extended, str(directory / "adapter"), adapter_name=adapter_name_for(task_name))
        info = json.loads((directory / "layer" / LAYER_CONFIG).read_text())
        self.placements[task_name] = LayerPlacement(**{k: info[k] for k in LayerPlacement.__dataclass_fields__})
        return self._remember(task_name, model, [block])
