"""What every extension kind shares: the unified config, freezing, statistics, per-task models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from jobs.spec import JobSpec, LayerSpec, LoRASpec
from worker.architectures import Architecture, architecture_for
from worker.device import DeviceManager
from worker.stats import ParamStats, count_params, param_stats


@dataclass
class ExtensionConfig:
    """One config for every extension kind: LoRA settings, layer settings, freezing, save path."""

    lora: LoRASpec = field(default_factory=LoRASpec)
    layer: LayerSpec = field(default_factory=LayerSpec)
    freeze_base: bool = True
    save_dir: Path | None = None

    @classmethod
    def from_job_spec(cls, spec: JobSpec, save_dir: Path | None = None) -> ExtensionConfig:
        return cls(lora=spec.lora or LoRASpec(), layer=spec.layer or LayerSpec(), save_dir=save_dir)


class BaseExtension:
    """Holds a base model and the per-task models built from it.

    `base_model` is frozen (when `config.freeze_base`) and never modified: each task's model
    is built on a structural copy that shares the frozen tensors.
    """

    kind: str = ""

    def __init__(self, base_model: torch.nn.Module, config: ExtensionConfig | None = None,
                 device_manager: DeviceManager | None = None):
        self.base_model = base_model
        self.config = config or ExtensionConfig()
        self.device_manager = device_manager
        self.arch: Architecture = architecture_for(base_model)
        if self.config.freeze_base:
            base_model.requires_grad_(False)
        self.base_params = count_params(base_model)
        self.models: dict[str, torch.nn.Module] = {}
        self.new_blocks: dict[str, list[torch.nn.Module]] = {}
        #: task -> the resolved LayerPlacement of its added block (layer and hybrid kinds)
        self.placements: dict = {}
        self.active_task: str | None = None

    # -- per-task bookkeeping -------------------------------------------------------------
    def _remember(self, task: str, model: torch.nn.Module, new_blocks: list[torch.nn.Module]) -> torch.nn.Module:
        self.models[task] = model
        self.new_blocks[task] = new_blocks
        self.active_task = task
        return model

    def model_for(self, task: str) -> torch.nn.Module:
        try:
            return self.models[task]
        except KeyError:
            raise KeyError(f"no model for task {task!r}; built tasks: {sorted(self.models)}") from None

    def switch(self, task: str) -> torch.nn.Module:
        """Make `task` the active one and return its model."""
        model = self.model_for(task)
        self.active_task = task
        return model

    def statistics(self, task: str | None = None) -> ParamStats:
        task = task or self.active_task
        return param_stats(self.model_for(task), self.base_params, self.new_blocks.get(task, []))

    def _place_trainable(self, module: torch.nn.Module) -> None:
        if self.device_manager is not None:
            self.device_manager.place_trainable(module)
