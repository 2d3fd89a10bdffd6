"""Extension kinds and their registry: kind -> builder class."""

from __future__ import annotations

from worker.extensions.base import BaseExtension, ExtensionConfig
from worker.extensions.hybrid import HybridExtension
from worker.extensions.layer import TransformerLayerExtension
from worker.extensions.lora import LoRAExtension

EXTENSIONS: dict[str, type[BaseExtension]] = {}


def register(kind: str, cls: type[BaseExtension]) -> None:
    if kind in EXTENSIONS:
        raise ValueError(f"extension kind {kind!r} is registered twice")
    EXTENSIONS[kind] = cls


register("lora", LoRAExtension)
register("layer", TransformerLayerExtension)
register("hybrid", HybridExtension)


def build(extension: BaseExtension, task_name: str):
    """Build `task_name`'s model with whichever create method the kind has."""
    if isinstance(extension, LoRAExtension):
        return extension.create_adapter(task_name)
    if isinstance(extension, HybridExtension):
        return extension.create_hybrid_model(task_name)
    return extension.create_extended_model(task_name)


__all__ = ["EXTENSIONS", "BaseExtension", "ExtensionConfig", "HybridExtension", "LoRAExtension",
           "TransformerLayerExtension", "build", "register"]
