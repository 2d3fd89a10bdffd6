"""Job specs (torch-free): defaults, constraints, unknown keys, messages naming key and fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from jobs.errors import describe_validation_error
from jobs.extensions import EXTENSION_KINDS, register
from jobs.spec import JobSpec, LayerSpec, LoRASpec, TrainSpec


def spec(**overrides):
    data = {"task": "reverse", "extension": "lora", "base_model": "random:t5-tiny", "kind": "create", **overrides}
    return JobSpec(**data)


def problems(**overrides) -> list[str]:
    with pytest.raises(ValidationError) as error:
        spec(**overrides)
    return describe_validation_error(error.value, "job 1 (reverse)")


def test_defaults_fill_the_sections_the_kind_uses():
    hybrid = spec(extension="hybrid")
    assert hybrid.lora == LoRASpec() and hybrid.layer == LayerSpec() and hybrid.train is None
    lora = spec(layer={"init_scale": 0})
    assert lora.layer is None  # defaults for another kind are dropped, not refused
    train = spec(kind="train", train={"dataset": "d.jsonl"})
    assert train.train.max_steps == 100 and train.train.batch_size == 8


@pytest.mark.parametrize("overrides,key,fix", [
    ({"lora": {"r": 0}}, "lora.r", "greater than 0"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout", "less than 1"),
    ({"lora": {"rank": 8}}, "lora.rank", "unknown key"),
    ({"lora": {"target_modules": []}}, "lora.target_modules", "at least one module"),
    ({"extension": "prefix"}, "extension", "'lora', 'layer', 'hybrid', 'adalora'"),
    ({"base_model": "random:t5-huge"}, "base_model", "choose one of"),
    ({"layer": {"stack": "middle"}, "extension": "layer"}, "layer.stack", "'encoder' or 'decoder'"),
    ({"layer": {"position": -1}, "extension": "layer"}, "layer.position", ">= 0 or 'end'"),
    ({"device": "gpu"}, "device", "cuda:N"),
    ({"kind": "train"}, "(job)", "needs a `train` section"),
    ({"kind": "train", "train": {"dataset": "d.jsonl", "batch_size": 0}}, "train.batch_size", "greater than 0"),
    ({"task": "../x"}, "task", "no slashes"),
    ({"task": "/etc/x"}, "task", "no slashes"),
    ({"task": "a/../../b"}, "task", "no slashes"),
    ({"task": "a\x00b"}, "task", "no slashes"),
    ({"task": "x" * 500}, "task", "1-64"),
    ({"priority": 10}, "priority", "less than or equal to 9"),
    ({"priority": "high"}, "priority", "valid integer"),
])
def test_bad_values_name_the_key_and_the_fix(overrides, key, fix):
    lines = problems(**overrides)
    assert any(f"key `{key}`" in line and fix in line for line in lines), lines
    assert all(line.startswith("job 1 (reverse): ") for line in lines)


def test_an_objective_the_family_cannot_train_is_refused_with_the_choices():
    lines = problems(kind="train", base_model="random:bert-tiny", train={"dataset": "d.jsonl", "objective": "causal"})
    assert any("encoder-only" in line and "use classification" in line for line in lines)


def test_a_registered_kind_is_valid_at_once_and_gets_only_its_sections():
    with pytest.raises(ValueError, match="'module:Class'"):
        register("toy", ("lora",), "tests.toy.ToyExtension")
    register("toy", ("lora",), "tests.toy:ToyExtension")  # only a worker imports the builder
    try:
        job = spec(extension="toy", layer={"init_scale": 0})
        assert job.lora == LoRASpec() and job.layer is None
        assert any("'hybrid-lokr' or 'toy'" in line for line in problems(extension="prefix"))
    finally:
        del EXTENSION_KINDS["toy"]


def test_queue_kind_routes_gpu_jobs_away_from_cpu_workers():
    assert spec(device="cuda:1").queue_kind == "gpu"
    assert spec(device="cpu").queue_kind == "cpu"
    assert spec().queue_kind == "any"


def test_every_field_has_help_text():
    for model in (LoRASpec, LayerSpec, TrainSpec, JobSpec):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no help text"
