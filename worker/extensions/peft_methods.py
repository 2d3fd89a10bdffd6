"""PEFT methods as extension kinds: one config builder per spec section.

A PEFT method is three entries, each a few lines:

- its spec section in jobs/spec.py (`IA3Spec`, and the JobSpec key `ia3` that holds it);
- its config builder here, `@peft_method("ia3")`: the section's settings as PEFT's config;
- its register lines in jobs/extensions.py: `register("ia3", ("ia3",), ...AdapterExtension)` alone,
  `register("hybrid-ia3", ("layer", "ia3"), ...HybridExtension)` with an added block.

Everything else is shared with LoRA: a task's adapter is built, trained, counted (the `lora`
parameter group: PEFT adapter parameters of any method, by PEFT's own bookkeeping), saved in
PEFT's format and reloaded with `PeftModel.from_pretrained`. The method a kind uses is the one
section of its config that has a builder here (`adapter_section`).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.adalora import AdaLoraModel

from jobs.spec import AdaLoRASpec, IA3Spec, LoHaSpec, LoKrSpec
from worker.architectures import Architecture
from worker.errors import ConfigError
from worker.extensions.lora import LoRAExtension, lora_config, resolve_targets, task_type_for

if TYPE_CHECKING:
    from worker.extensions.base import ExtensionConfig

#: spec section -> builder of its PEFT config from (model, section spec, architecture)
PEFT_METHODS: dict[str, Callable[[torch.nn.Module, Any, Architecture], PeftConfig]] = {}
#: the initialisations that rewrite the base weights they adapt (PEFT's `init_lora_weights`)
REWRITES_BASE = ("pissa", "olora")


def peft_method(section: str):
    """Register the decorated function as the PEFT config builder of spec section `section`."""
    def register(build: Callable[[torch.nn.Module, Any, Architecture], PeftConfig]):
        if section in PEFT_METHODS:
            raise ValueError(f"PEFT method {section!r} is registered twice")
        PEFT_METHODS[section] = build
        return build
    return register


peft_method("lora")(lora_config)


@peft_method("ia3")
def ia3_config(model: torch.nn.Module, spec: IA3Spec, arch: Architecture) -> IA3Config:
    family_default = spec.target_modules is None and arch.default_ia3_targets
    targets = resolve_targets(model, spec, arch, section="ia3",
                              default=arch.default_ia3_targets or arch.default_lora_targets)
    feedforward = spec.feedforward_modules
    if feedforward is None:
        feedforward = list(arch.default_ia3_feedforward) if family_default else []
    missing = [name for name in feedforward if name not in targets]
    if missing:
        raise ConfigError(f"ia3.feedforward_modules: {missing} are not among the targets {targets}; add them to "
                          "ia3.target_modules or leave them out")
    return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=task_type_for(model, arch),
                     fan_in_fan_out=arch.weights_fan_in_fan_out)


def _no_transposed_weights(section: str, arch: Architecture) -> None:
    if arch.weights_fan_in_fan_out:
        raise ConfigError(f"extension: PEFT's {section} adapts Linear layers only, and {arch.family} models keep "
                          f"theirs as transposed Conv1D layers; use lora, adalora or ia3 on a {arch.family} base")


@peft_method("loha")
def loha_config(model: torch.nn.Module, spec: LoHaSpec, arch: Architecture) -> LoHaConfig:
    _no_transposed_weights("LoHa", arch)
    return LoHaConfig(r=spec.r, alpha=spec.alpha, rank_dropout=spec.rank_dropout, module_dropout=spec.module_dropout,
                      target_modules=resolve_targets(model, spec, arch, section="loha"), task_type=task_type_for(model, arch))


@peft_method("lokr")
def lokr_config(model: torch.nn.Module, spec: LoKrSpec, arch: Architecture) -> LoKrConfig:
    _no_transposed_weights("LoKr", arch)
    return LoKrConfig(r=spec.r, alpha=spec.alpha, rank_dropout=spec.rank_dropout, module_dropout=spec.module_dropout,
                      target_modules=resolve_targets(model, spec, arch, section="lokr"), task_type=task_type_for(model, arch))


@peft_method("adalora")
def adalora_config(model: torch.nn.Module, spec: AdaLoRASpec, arch: Architecture) -> AdaLoraConfig:
    # A create job trains no steps; its schedule only needs a length PEFT accepts.
    total_step = spec.total_step or spec.tinit + spec.tfinal + 1
    return AdaLoraConfig(init_r=spec.init_r, target_r=spec.target_r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                         tinit=spec.tinit, tfinal=spec.tfinal, deltaT=spec.deltaT, beta1=spec.beta1, beta2=spec.beta2,
                         orth_reg_weight=spec.orth_reg_weight, total_step=total_step,
                         target_modules=resolve_targets(model, spec, arch, section="adalora"),
                         task_type=task_type_for(model, arch), fan_in_fan_out=arch.weights_fan_in_fan_out)


def adapter_section(config: ExtensionConfig) -> str:
    """The spec section whose PEFT method a kind's adapters use: the one section of `config` with a
    builder in PEFT_METHODS (`lora` when none is given). Raises ConfigError for two."""
    sections = [name for name in config.sections if name in PEFT_METHODS]
    if len(sections) > 1:
        raise ConfigError(f"sections {', '.join(sections)}: an extension uses one PEFT method; give one of them")
    return sections[0] if sections else "lora"


def add_adapter(model: torch.nn.Module, section: str, spec: Any, arch: Architecture,
                adapter_name: str = "default") -> PeftModel:
    """Wrap `model` (in place) with an adapter of `section`'s PEFT method; its weights are fp32 and trainable.

    An initialisation that rewrites the base weights (PiSSA, OLoRA) gets copies of them first,
    since the model shares its tensors with the cached base, and keeps its initial adapter so that
    `save_adapter` converts the trained one into a plain LoRA on the unchanged base.
    """
    config = PEFT_METHODS[section](model, spec, arch)
    rewrites = str(getattr(config, "init_lora_weights", "")) in REWRITES_BASE
    if rewrites:
        if isinstance(model, PeftModel):
            raise ConfigError(f"lora.init: {config.init_lora_weights} rewrites the base weights, so its adapter "
                              "cannot share a model with another task's; build it on a model of its own")
        _own_weights(model, config.target_modules)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        model.set_adapter(adapter_name)
    else:
        # autocast_adapter_dtype keeps the adapters in fp32 on a bf16/fp16 base (the dtype policy).
        model = get_peft_model(model, config, adapter_name=adapter_name, autocast_adapter_dtype=True)
    if rewrites:
        _keep_initial_adapter(model, adapter_name)
    return model


def _own_weights(model: torch.nn.Module, targets: list[str]) -> None:
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets) and hasattr(module, "weight"):
            module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)


def _keep_initial_adapter(model: PeftModel, adapter_name: str) -> None:
    staging = Path(tempfile.mkdtemp(prefix="graftq-initial-"))
    weakref.finalize(model, shutil.rmtree, str(staging), True)
    model.save_pretrained(str(staging), selected_adapters=[adapter_name], safe_serialization=True,
                          save_embedding_layers=False)
    produced = staging / adapter_name if (staging / adapter_name).is_dir() else staging
    # PEFT loads the initial adapter under its directory's name: it must not be the trained adapter's
    initial = staging / "initial"
    if produced == staging:
        initial.mkdir()
        for file in list(staging.iterdir()):
            if file != initial:
                shutil.move(str(file), str(initial / file.name))
    else:
        produced.rename(initial)
    initials = getattr(model, "graftq_initial_adapters", {})
    initials[adapter_name] = initial
    object.__setattr__(model, "graftq_initial_adapters", initials)


def initial_adapter(model: torch.nn.Module, adapter_name: str) -> Path | None:
    """Where `add_adapter` kept the initial weights of a base-rewriting adapter (None for others)."""
    return getattr(model, "graftq_initial_adapters", {}).get(adapter_name)


def after_adapter_step(model: torch.nn.Module, step: int) -> None:
    """The PEFT method's work after optimizer step `step` (0-based), before gradients are cleared:
    AdaLoRA's rank budget reallocation; nothing for the other methods."""
    tuner = getattr(model, "base_model", None) if isinstance(model, PeftModel) else None
    if isinstance(tuner, AdaLoraModel):
        tuner.update_and_allocate(step)


class AdapterExtension(LoRAExtension):
    """Adapters of one PEFT method, one per task, on one shared copy of the base model: the method is
    the one adapter section of the config (`ExtensionConfig(ia3=IA3Spec())` for IA3)."""
