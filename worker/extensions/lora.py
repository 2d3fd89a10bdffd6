"""LoRA adapters through PEFT, saved in PEFT's own format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from transformers.pytorch_utils import Conv1D

from jobs.spec import LoRASpec
from worker.architectures import Architecture
from worker.errors import ConfigError
from worker.extensions.base import BaseExtension
from worker.models import classification_head, structural_copy
from worker.stats import adapter_parameters

#: what PEFT can wrap; Conv1D is transformers' transposed Linear (Architecture.weights_fan_in_fan_out)
ADAPTABLE = (torch.nn.Linear, Conv1D)


def _linear_modules(model: torch.nn.Module) -> list[str]:
    """Dotted names of the model's Linear (and GPT-2 Conv1D) modules; an already LoRA-wrapped one
    counts under its own name, not as `base_layer`, and the adapters' own Linears do not count."""
    return [name.removesuffix(".base_layer") for name, module in model.named_modules()
            if isinstance(module, ADAPTABLE) and ".lora_" not in name]


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's Linear (and GPT-2 Conv1D) modules."""
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_modules(model)})


def resolve_targets(model: torch.nn.Module, spec: LoRASpec, arch: Architecture, section: str = "lora",
                    default: tuple[str, ...] | None = None) -> list[str]:
    """Check the `section` spec's target_modules (else `default`, else the family's LoRA targets) against
    the model; ConfigError lists the model's Linear module names."""
    targets = list(spec.target_modules or default or arch.default_lora_targets)
    names = _linear_modules(model)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(
            f"{section}.target_modules: no Linear module named {', '.join(map(repr, missing))} in this {arch.family} "
            f"model; its Linear modules are: {', '.join(linear_module_names(model))}"
        )
    return targets


def adapter_name_for(task_name: str) -> str:
    """The PEFT adapter name of a task.

    Task names may contain '.', which PEFT cannot have in an adapter name (it becomes a module
    key), and a short name such as `a` or `or` is a substring of PEFT's `lora_` parameter
    prefix, which PEFT warns may re-initialise the adapter on load. A fixed prefix and a
    spelled-out dot avoid both.
    """
    return "task_" + task_name.replace(".", "-dot-")


def task_type_for(model: torch.nn.Module, arch: Architecture) -> str | None:
    """PEFT's task type of `model` (None: no task head PEFT knows). SEQ_CLS for a classifier: PEFT
    then trains and saves its head with the adapter (`modules_to_save`), whatever the method."""
    if classification_head(model) is not None:
        return "SEQ_CLS"
    return {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM"}.get(arch.task_type)


def lora_config(model: torch.nn.Module, spec: LoRASpec, arch: Architecture) -> LoraConfig:
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=resolve_targets(model, spec, arch),
        task_type=task_type_for(model, arch),
        fan_in_fan_out=arch.weights_fan_in_fan_out,
        bias="none",
        use_dora=spec.variant == "dora",
        use_rslora=spec.variant == "rslora",
        init_lora_weights=True if spec.init == "default" else spec.init,
    )


def add_lora(model: torch.nn.Module, spec: LoRASpec, arch: Architecture, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` (in place) with a LoRA adapter; adapter weights are fp32 and trainable."""
    from worker.extensions.peft_methods import add_adapter  # built on this module's helpers

    return add_adapter(model, "lora", spec, arch, adapter_name)


def load_trainable_adapter(model: torch.nn.Module, job_dir: Path, adapter_name: str,
                           device: str | None = None) -> tuple[PeftModel, dict[str, Any]]:
    """Wrap `model` (in place) with the adapter that the job in `job_dir` saved, as a trainable
    adapter named `adapter_name` (continued training); its settings are that adapter's own.

    Returns (the PeftModel, origin): `origin` records the job directory and the adapter settings
    that came with it. Raises ConfigError when `job_dir` holds no adapter.
    """
    directory = Path(job_dir) / "adapter"
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(f"lora.from: job directory {job_dir} holds no adapter (no adapter/adapter_config.json); "
                          "`lora.from` must name a lora or hybrid job")
    saved = json.loads(config_file.read_text())
    if isinstance(model, PeftModel):
        model.load_adapter(str(directory), adapter_name=adapter_name, is_trainable=True, torch_device=device)
        model.set_adapter(adapter_name)
    else:
        # autocast_adapter_dtype (the default) keeps the adapter in fp32 on a bf16/fp16 base
        model = PeftModel.from_pretrained(model, str(directory), adapter_name=adapter_name, is_trainable=True,
                                          torch_device=device)
    settings = {"peft_type": saved.get("peft_type"), "r": saved.get("r"), "alpha": saved.get("lora_alpha"),
                "dropout": saved.get("lora_dropout"), "target_modules": saved.get("target_modules")}
    return model, {"job_dir": str(job_dir), "settings": settings, "settings_from": str(config_file)}


def add_task_adapter(extension: BaseExtension, model: torch.nn.Module, task_name: str) -> PeftModel:
    """`model` wrapped (in place) with `task_name`'s adapter: a new one from the extension's `lora`
    section, or the one its `config.start_from["lora"]` job saved (recorded in `extension.origins`)."""
    from worker.extensions.peft_methods import adapter_section, add_adapter  # built on this module's helpers

    adapter_name = adapter_name_for(task_name)
    start_from = extension.config.start_from.get("lora")
    if start_from is None:
        section = adapter_section(extension.config)
        return add_adapter(model, section, extension.config.section(section), extension.arch, adapter_name)
    device = str(extension.device_manager.device) if extension.device_manager is not None else None
    model, origin = load_trainable_adapter(model, start_from, adapter_name, device)
    extension.origins.setdefault(task_name, {})["lora"] = origin
    return model


def save_adapter(model: PeftModel, directory: Path, adapter_name: str = "default") -> Path:
    """Save one adapter in PEFT format directly in `directory` (adapter_config.json + safetensors).

    A PiSSA/OLoRA adapter is saved converted (PEFT's `path_initial_model_for_weight_conversion`): a
    plain LoRA of twice the rank that applies to the unchanged base.
    """
    from worker.extensions.peft_methods import initial_adapter  # built on this module's helpers

    directory = Path(directory)
    staging = directory.with_name(directory.name + ".peft")
    initial = initial_adapter(model, adapter_name)
    model.save_pretrained(str(staging), selected_adapters=[adapter_name], safe_serialization=True,
                          save_embedding_layers=False,  # never look the base model up on a hub
                          path_initial_model_for_weight_conversion=str(initial) if initial else None)
    # PEFT puts every adapter but "default" in a sub-directory named after it.
    produced = staging / adapter_name if (staging / adapter_name / "adapter_config.json").exists() else staging
    shutil.move(str(produced), str(directory))
    shutil.rmtree(staging, ignore_errors=True)
    return directory


class LoRAExtension(BaseExtension):
    """LoRA adapters, one per task, on one shared copy of the base model (switch with `switch`).

    With `config.start_from["lora"]` a task's adapter starts as the adapter that job saved, with
    that adapter's settings (the `lora` section's r, alpha, dropout and target_modules are ignored).
    """

    starts_from = ("lora",)

    def __init__(self, base_model, config=None, device_manager=None):
        super().__init__(base_model, config, device_manager)
        self.peft_model: PeftModel | None = None

    def create_adapter(self, task_name: str) -> PeftModel:
        if task_name in self.models:
            raise ValueError(f"task {task_name!r} already has an adapter")
        target = self.peft_model if self.peft_model is not None else structural_copy(self.base_model)
        self.peft_model = add_task_adapter(self, target, task_name)
        return self._remember(task_name, self.peft_model, [])

    build = create_adapter

    def switch(self, task_name: str) -> PeftModel:
        model = super().switch(task_name)
        model.set_adapter(adapter_name_for(task_name))
        return model

    def parameter_groups(self, task_name: str) -> dict[str, list[torch.nn.Parameter]]:
        return {"lora": adapter_parameters(self.model_for(task_name), adapter_name_for(task_name))}

    def save(self, task_name: str, directory: Path) -> dict[str, Path]:
        return {"adapter": save_adapter(self.model_for(task_name), Path(directory) / "adapter",
                                        adapter_name=adapter_name_for(task_name))}

    def load(self, task_name: str, directory: Path) -> PeftModel:
        """Load the adapter that `save(task_name, directory)` wrote."""
        adapter = str(Path(directory) / "adapter")
        if self.peft_model is None:
            self.peft_model = PeftModel.from_pretrained(structural_copy(self.base_model), adapter,
                                                        adapter_name=adapter_name_for(task_name))
        else:
            self.peft_model.load_adapter(adapter, adapter_name=adapter_name_for(task_name))
        self.peft_model.set_adapter(adapter_name_for(task_name))
        return self._remember(task_name, self.peft_model, [])
