"""The extension kinds a job's `extension:` may name: one registry, torch-free.

Each kind names the spec sections it reads (checked when a batch is validated) and its
builder, a `module:Class` path that only the worker imports (`worker.extensions.extension_class`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExtensionKind:
    name: str
    #: the JobSpec sections the kind reads (`lora`, `layer`, ...); the others are dropped from its jobs
    sections: tuple[str, ...]
    #: "module:Class" of its BaseExtension subclass (worker/extensions/base.py)
    builder: str


EXTENSION_KINDS: dict[str, ExtensionKind] = {}


def register(kind: str, sections: tuple[str, ...], builder: str) -> ExtensionKind:
    """Make `kind` a valid `extension:`; raises ValueError for a name registered twice or a bad builder path."""
    if kind in EXTENSION_KINDS:
        raise ValueError(f"extension kind {kind!r} is registered twice")
    module, _, attribute = builder.partition(":")
    if not module or not attribute.isidentifier():
        raise ValueError(f"extension kind {kind!r}: builder {builder!r} is not a 'module:Class' path")
    EXTENSION_KINDS[kind] = ExtensionKind(kind, tuple(sections), builder)
    return EXTENSION_KINDS[kind]


register("lora", ("lora",), "worker.extensions.lora:LoRAExtension")
register("layer", ("layer",), "worker.extensions.layer:TransformerLayerExtension")
register("hybrid", ("layer", "lora"), "worker.extensions.hybrid:HybridExtension")
# PEFT methods beyond LoRA: a spec section each (jobs/spec.py) and a config builder each
# (worker/extensions/peft_methods.py), alone and after an added block (as `hybrid` does with LoRA).
# AdaLoRA has no hybrid: its per-module rank counters are parameters a block would save as its own.
register("adalora", ("adalora",), "worker.extensions.peft_methods:AdapterExtension")
register("ia3", ("ia3",), "worker.extensions.peft_methods:AdapterExtension")
register("loha", ("loha",), "worker.extensions.peft_methods:AdapterExtension")
register("lokr", ("lokr",), "worker.extensions.peft_methods:AdapterExtension")
register("hybrid-ia3", ("layer", "ia3"), "worker.extensions.hybrid:HybridExtension")
register("hybrid-loha", ("layer", "loha"), "worker.extensions.hybrid:HybridExtension")
register("hybrid-lokr", ("layer", "lokr"), "worker.extensions.hybrid:HybridExtension")
