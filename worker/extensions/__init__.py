"""Extension kinds: the classes of the Python API, and the builder of each registered kind."""

from __future__ import annotations

import importlib

from jobs.extensions import EXTENSION_KINDS
from worker.extensions.base import BaseExtension, ExtensionConfig
from worker.extensions.hybrid import HybridExtension
from worker.extensions.layer import TransformerLayerExtension
from worker.extensions.lora import LoRAExtension
from worker.extensions.peft_methods import AdapterExtension


def extension_class(kind: str) -> type[BaseExtension]:
    """The BaseExtension subclass registered for `kind` in jobs/extensions.py."""
    module, _, name = EXTENSION_KINDS[kind].builder.partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["AdapterExtension", "BaseExtension", "ExtensionConfig", "HybridExtension", "LoRAExtension", "TransformerLayerExtension",
           "extension_class"]
