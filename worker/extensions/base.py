"""What every extension kind shares: its config, freezing, statistics, per-task models.

An extension kind is a BaseExtension subclass that implements `build`, `save` and
`parameter_groups`, registered (with the spec sections it reads) in jobs/extensions.py.
A kind that can build on another job's artifacts (the `from` key of a section) lists that
section in `starts_from`; any other kind refuses a `from`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file

from jobs.extensions import EXTENSION_KINDS
from jobs.spec import SECTION_SPECS, JobSpec
from worker.architectures import Architecture, architecture_for
from worker.device import DeviceManager
from worker.errors import ConfigError
from worker.models import classification_head
from worker.stats import ParamStats, count_params, param_stats

HEAD_WEIGHTS = "head.safetensors"


class ExtensionConfig:
    """The spec sections an extension reads, by name, whether its base model is frozen, and the
    artifacts of earlier jobs that sections start from.

    `ExtensionConfig(lora=LoRASpec(r=8), layer=LayerSpec())`: a section left out has its defaults.
    `start_from={"layer": job_dir}`: the `layer` section builds on the block that the job in
    `job_dir` saved (what a spec's `layer.from` names), `{"lora": job_dir}` on its adapter.
    Raises TypeError for a name that is no spec section.
    """

    def __init__(self, freeze_base: bool = True, start_from: Mapping[str, str | Path] | None = None,
                 **sections: Any):
        unknown = sorted((set(sections) | set(start_from or {})) - set(SECTION_SPECS))
        if unknown:
            raise TypeError(f"ExtensionConfig: no spec section named {', '.join(unknown)}; "
                            f"the sections are {', '.join(SECTION_SPECS)}")
        self.freeze_base = freeze_base
        self.sections = {name: spec for name, spec in sections.items() if spec is not None}
        #: section name -> the directory of the job whose artifacts that section starts from
        self.start_from = {name: Path(directory) for name, directory in (start_from or {}).items()}

    @classmethod
    def from_job_spec(cls, spec: JobSpec, start_from: Mapping[str, str | Path] | None = None) -> ExtensionConfig:
        return cls(start_from=start_from,
                   **{name: getattr(spec, name) for name in EXTENSION_KINDS[spec.extension].sections})

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
      in worker.stats.GROUPS counts in that statistic ("lora" in `lora_params`: PEFT adapters).
      Only what the task trains: a part it uses but keeps frozen (a block loaded from another job
      with `layer.freeze`) is in no group, so it counts in `total_params` only;
    - `load(task, directory)`: the task's model rebuilt from what `save` wrote.

    On a sequence classifier the head is handled here for every kind: it trains (PEFT's own copy
    under an adapter, else the head itself), counts in `head_params`, and `save_head`/`load_head`
    keep it under `head/` when no PEFT adapter holds it.

    `starts_from` names the sections whose `config.start_from` the kind's `build` honours; a
    `start_from` for any other section is refused with a ConfigError.
    """

    #: the spec sections whose `from` this kind implements (keys of `config.start_from` it accepts)
    starts_from: tuple[str, ...] = ()

    def __init__(self, base_model: torch.nn.Module, config: ExtensionConfig | None = None,
                 device_manager: DeviceManager | None = None):
        self.base_model = base_model
        self.config = config or ExtensionConfig()
        refused = sorted(set(self.config.start_from) - set(self.starts_from))
        if refused:
            raise ConfigError(f"{refused[0]}.from: a {type(self).__name__} cannot start from another job's "
                              f"artifacts; leave `{refused[0]}.from` out, or use an extension kind that "
                              f"builds on them ({refused[0]} and hybrid for layer.from, lora and hybrid for "
                              "lora.from)")
        self.device_manager = device_manager
        self.arch: Architecture = architecture_for(base_model)
        if self.config.freeze_base:
            base_model.requires_grad_(False)
        # A classifier's head is the job's (it trains, and counts in head_params), not the base's.
        head = classification_head(base_model)
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        self.base_params = count_params(p for p in base_model.parameters() if id(p) not in head_ids)
        self.models: dict[str, torch.nn.Module] = {}
        self.new_blocks: dict[str, list[torch.nn.Module]] = {}
        #: task -> the resolved LayerPlacement of its added block (layer and hybrid kinds)
        self.placements: dict = {}
        #: task -> section -> what that section started from (another job's artifacts), for job.json
        self.origins: dict[str, dict[str, dict[str, Any]]] = {}
        self.active_task: str | None = None

    # -- per-task bookkeeping -------------------------------------------------------------
    def _remember(self, task: str, model: torch.nn.Module, new_blocks: list[torch.nn.Module]) -> torch.nn.Module:
        head = classification_head(model)
        if head is not None and not isinstance(head, ModulesToSaveWrapper):
            # Outside PEFT (an added block alone) the head trains as it is; PEFT trains its own copy.
            head.requires_grad_(True)
            self._place_trainable(head)
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
        """Parameter counts of `task`'s model (the active task's by default), from its parameter groups
        and, on a classifier, its head (`head_params`)."""
        task = task or self.active_task
        groups = dict(self.parameter_groups(task))
        head = self.head_parameters(task)
        if head:
            groups.setdefault("head", head)
        return param_stats(self.model_for(task), self.base_params, groups)

    def head_parameters(self, task: str) -> list[torch.nn.Parameter]:
        """The classifier head that `task` trains (PEFT's copy for the task's adapter on a PEFT model);
        empty for a model without a classification head."""
        head = classification_head(self.model_for(task))
        if head is None:
            return []
        if isinstance(head, ModulesToSaveWrapper):
            from worker.extensions.lora import adapter_name_for

            name = adapter_name_for(task)
            copies = head.modules_to_save
            return list(copies[name].parameters()) if name in copies else []
        return list(head.parameters())

    def save_head(self, task: str, directory: Path) -> dict[str, Path]:
        """Save `task`'s classifier head when no PEFT adapter holds it (`modules_to_save`), as a layer
        job's: {"head": its directory}; {} otherwise."""
        head = classification_head(self.model_for(task))
        if head is None or isinstance(head, ModulesToSaveWrapper):
            return {}
        target = Path(directory) / "head"
        target.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in head.state_dict().items()},
                  str(target / HEAD_WEIGHTS))
        return {"head": target}

    @staticmethod
    def load_head(model: torch.nn.Module, directory: Path) -> None:
        """Load the head that `save_head` wrote into `model`'s head (nothing when none was saved)."""
        saved = Path(directory) / "head" / HEAD_WEIGHTS
        head = classification_head(model)
        if head is not None and saved.is_file():
            head.load_state_dict(load_file(str(saved)), strict=True)

    def after_step(self, task: str, step: int) -> None:
        """Called by the trainer after optimizer step `step` (0-based), before the gradients are cleared:
        the PEFT method's per-step work (AdaLoRA reallocates its rank budget); nothing for other kinds."""
        from worker.extensions.peft_methods import after_adapter_step  # it builds on the kinds built on this

        after_adapter_step(self.model_for(task), step)

    def _place_trainable(self, module: torch.nn.Module) -> None:
        if self.device_manager is not None:
            self.device_manager.place_trainable(module)
