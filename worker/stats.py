"""Parameter statistics, each parameter counted once (tied weights once)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    # named_parameters() de-duplicates shared tensors (remove_duplicate=True), so tied
    # embeddings and the parameters a structural copy shares count once.
    return sum(p.numel() for _, p in module.named_parameters() if p.requires_grad or not trainable_only)


def is_lora_param(name: str) -> bool:
    return "lora_" in name


@dataclass(frozen=True)
class ParamStats:
    base_params: int
    total_params: int
    trainable_params: int
    lora_params: int
    layer_params: int

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.base_params if self.base_params else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "trainable_pct": self.trainable_pct}


def param_stats(model: torch.nn.Module, base_params: int, new_blocks: list[torch.nn.Module]) -> ParamStats:
    """Statistics of an extended model; `new_blocks` are the added transformer blocks (may be empty)."""
    names = dict(model.named_parameters())
    total = sum(p.numel() for p in names.values())
    trainable = sum(p.numel() for p in names.values() if p.requires_grad)
    lora = sum(p.numel() for n, p in names.items() if is_lora_param(n))
    layer = sum(p.numel() for block in new_blocks for n, p in block.named_parameters() if not is_lora_param(n))
    return ParamStats(base_params=base_params, total_params=total, trainable_params=trainable,
                      lora_params=lora, layer_params=layer)
