"""What every extension kind shares: its config, freezing, statistics, per-task models.

An extension kind is a BaseExtension subclass that implements `build`, `save` and
`parameter_groups`, registered (with the spec sections it reads) in jobs/extensions.py.
"""

from __future__ import annotations

from typing import Any

import torch

from jobs.extensions import EXTENSION_KINDS
from jobs.spec import SECTION_SPECS, JobSpec
from worker.architectures import Architecture, architecture_for
from worker.device import DeviceManager
from worker.stats import ParamStats, count_params, param_stats


class ExtensionConfig:
    """The spec sections an extension reads, by name, and whether its base model is frozen.

    `ExtensionConfig(lora=LoRASpec(r=8), layer=LayerSpec())`: a section left out has its defaults.
    Raises TypeError for a name that is no spec section.
    """

    def __init__(self, freeze_base: bool = True, **sections: Any):
        unknown = sorted(set(sections) - set(SECTION_SPECS))
        if unknown:
            raise TypeError(f"ExtensionConfig: no spec section named {', '.join(unknown)}; "
                            f"the sections are {', '.join(SECTION_SPECS)}")
        self.freeze_base = freeze_base
        self.sections = {name: spec for name, spec in sections.items() if spec is not None}

    @classmethod
    def from_job_spec(cls, spec: JobSpec) -> ExtensionConfig:
        return cls(**{name: getattr(spec, name) for name in EXTENSION_KINDS[spec.extension].sections})

    def section(self, name: str) -> Any:
        """The `name` section (a LoRASpec for `lora`, ...): the one given, else its defaults."""
        return self.sections.get(name) or SECTION_SPECS[name]()


class BaseExtension:
    """Holds a base model and the per-task models built from it.

    `base_model` is frozen (when `config.freeze_base`) and never modified: each task's model
    is built on a structural copy that shares the frozen tensors. A kind implements:

    - `build(task)`: the task's model, trainable parameters in place;
    - `save(task, directory)`: writes the task's artifacts, returns {role: path} ("adapter"
      for PEFT's format, "layer" for an added block);
    - `parameter_groups(task)`: {group: parameters} of what trains for the task; a group named
      in worker.stats.GROUPS counts in that statistic ("lora" in `lora_params`: PEFT adapters);
    - `load(task, directory)`: the task's model rebuilt from what `save` wrote.
    """

    def __init__(self, base_model: torch.nn.Module, config: ExtensionConfig | None = None,
                 device_manager: DeviceManager | None = None):
        self.base_model = base_model
        self.config = config or ExtensionConfig()
        self.device_manager = device_manager
        self.arch: Architecture = architecture_for(base_model)
        if self.config.freeze_base:
            base_model.requires_grad_(False)
        self.base_params = count_params(base_model.parameters())
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
        """Parameter counts of `task`'s model (the active task's by default), from its parameter groups."""
        task = task or self.active_task
        return param_stats(self.model_for(task), self.base_params, self.parameter_groups(task))

    def _place_trainable(self, module: torch.nn.Module) -> None:
        if self.device_manager is not None:
            self.device_manager.place_trainable(module)
