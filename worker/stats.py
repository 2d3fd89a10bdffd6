"""Parameter statistics from the parameter groups an extension declares, each tensor counted once."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper

#: the parameter groups an extension may declare; group `g` is counted in `g_params`
#: ("head": a classifier's head, which trains with any kind)
GROUPS = ("lora", "layer", "head")


def count_params(params: Iterable[torch.nn.Parameter]) -> int:
    """Elements of the distinct tensors in `params`: a tied or shared tensor counts once."""
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def adapter_parameters(module: torch.nn.Module, adapter_name: str | None = None) -> list[torch.nn.Parameter]:
    """The parameters that PEFT's tuner layers in `module` hold for `adapter_name` (for every adapter
    when None), by PEFT's own bookkeeping (`adapter_layer_names`), so any PEFT method is covered."""
    found: dict[int, torch.nn.Parameter] = {}
    for layer in module.modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        for attribute in layer.adapter_layer_names:
            for name, item in getattr(layer, attribute).items():
                if adapter_name is None or name == adapter_name:
                    found.update((id(p), p) for p in (item.parameters() if isinstance(item, torch.nn.Module) else [item]))
    return list(found.values())


def own_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """`module`'s parameters that belong to no PEFT adapter (an added block's own weights)."""
    adapters = {id(p) for p in adapter_parameters(module)}
    return [p for p in module.parameters() if id(p) not in adapters]


def saved_module_copies(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of PEFT's `modules_to_save` wrappers in `module` (a classifier's head): the frozen
    original and every adapter's trainable copy. A task's model computes with its own copy only."""
    return [p for layer in module.modules() if isinstance(layer, ModulesToSaveWrapper) for p in layer.parameters()]


@dataclass(frozen=True)
class ParamStats:
    base_params: int
    total_params: int
    trainable_params: int
    lora_params: int
    layer_params: int
    head_params: int = 0

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.base_params if self.base_params else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "trainable_pct": self.trainable_pct}


def param_stats(model: torch.nn.Module, base_params: int,
                groups: dict[str, list[torch.nn.Parameter]]) -> ParamStats:
    """Statistics of one task's model from its trainable parameter `groups` (names from GROUPS).

    The model's total leaves out adapters of other tasks that live on the same model.
    Raises ValueError for a group name that no statistic counts.
    """
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"parameter groups {sorted(unknown)} are counted nowhere; use {', '.join(GROUPS)}")
    own = [p for params in groups.values() for p in params]
    others = ({id(p) for p in adapter_parameters(model)} | {id(p) for p in saved_module_copies(model)}) - {
        id(p) for p in own}
    return ParamStats(base_params=base_params,
                      total_params=count_params(p for p in model.parameters() if id(p) not in others),
                      trainable_params=count_params(own),
                      lora_params=count_params(groups.get("lora", ())), layer_params=count_params(groups.get("layer", ())),
                      head_params=count_params(groups.get("head", ())))
