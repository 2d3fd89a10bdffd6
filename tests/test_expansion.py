"""Several added blocks per job: `layer.positions`, `layer.source: previous`, `layer.expand`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from jobs.batch import parse_batch
from jobs.errors import SpecError
from jobs.spec import JobSpec, LayerSpec, LoRASpec
from worker.architectures import architecture_for
from worker.device import DeviceManager
from worker.errors import ConfigError
from worker.extensions import ExtensionConfig, HybridExtension, TransformerLayerExtension
from worker.extensions.layer import find_stack
from worker.models import build_random_preset
from worker.pipeline import JobContext, load_job_model, run_job

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


@pytest.fixture(scope="module")
def device_manager():
    return DeviceManager("cpu")


def base(preset: str) -> torch.nn.Module:
    return build_random_preset(preset)[0].eval()


def logits(model, ids):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


def stack_of(model, stack=None):
    arch = architecture_for(model)
    return find_stack(model, arch, stack or arch.default_stack)[2]


def job(extension="layer", preset="gpt2-tiny", kind="train", **layer) -> JobSpec:
    train = {"dataset": str(DATA / "reverse.jsonl"), "max_steps": 2, "batch_size": 4, "checkpoint_every": 0}
    return JobSpec.model_validate({"task": "t", "kind": kind, "extension": extension, "base_model": f"random:{preset}",
                                   "device": "cpu", "train": train if kind == "train" else None,
                                   "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "layer": layer})


def run(spec, root, job_id="j1", needed=None):
    return run_job(JobContext(job_id=job_id, batch_id="b", spec=spec, artifacts_root=root, needed_dirs=needed or {}))


@pytest.mark.parametrize("preset,layer", [
    ("t5-tiny", {"stack": "decoder", "positions": [1, 2, 2], "source": "previous"}),
    ("t5-tiny", {"expand": {"every": 1}}),
    ("gpt2-tiny", {"positions": [0, 2], "source": 1}),
    ("llama-tiny", {"expand": {"every": 1}}),
    ("gemma-tiny", {"positions": [1, 2], "source": "previous"}),
    ("phi3-tiny", {"expand": {"every": 2}}),
])
def test_several_blocks_at_init_scale_zero_are_an_exact_identity(preset, layer, device_manager):
    model = base(preset)
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = logits(model, ids)
    spec = LayerSpec(init_scale=0.0, **layer)
    extension = TransformerLayerExtension(model, ExtensionConfig(layer=spec), device_manager)
    extended = extension.build("t").eval()
    added = len(spec.positions) if spec.positions else 2 // spec.expand.every
    assert len(extension.new_blocks["t"]) == added
    assert len(stack_of(extended, spec.stack)) == 2 + added
    assert torch.equal(logits(extended, ids), expected)


def test_bart_is_post_norm_so_init_scale_zero_is_no_exact_identity(device_manager):
    model = base("bart-tiny")
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    extension = TransformerLayerExtension(model, ExtensionConfig(layer=LayerSpec(init_scale=0.0)), device_manager)
    # the new block's LayerNorm still acts on the residual stream: close, not equal
    assert not torch.equal(logits(extension.build("t").eval(), ids), logits(model, ids))


def _copied_from(extended, original, stack=None) -> list[int | None]:
    """For each block of the extended stack: the index of the base block it is (shares tensors
    with) or a copy of (equal values at init_scale 1), None if neither."""
    found = []
    for block in stack_of(extended, stack):
        state = block.state_dict()
        match = None
        for index, source in enumerate(stack_of(original, stack)):
            other = source.state_dict()
            if state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state):
                match = index
                break
        found.append(match)
    return found


@pytest.mark.parametrize("layer,expected,added_at", [
    ({"positions": [0, 2], "source": 1}, [1, 0, 1, 1], [0, 3]),
    ({"positions": [2, 1, 2], "source": "previous"}, [0, 0, 1, 1, 1], [1, 3, 4]),
    ({"expand": {"every": 1}}, [0, 0, 1, 1], [1, 3]),
    ({"expand": {"every": 2}}, [0, 1, 1], [2]),
    ({"position": 1, "source": "previous"}, [0, 0, 1], [1]),
])
def test_blocks_go_where_the_keys_say(layer, expected, added_at, device_manager):
    original = base("llama-tiny")
    extension = TransformerLayerExtension(original, ExtensionConfig(layer=LayerSpec(init_scale=1.0, **layer)),
                                          device_manager)
    extended = extension.build("t")
    assert _copied_from(extended, original) == expected
    new = {id(block) for block in extension.new_blocks["t"]}
    assert [index for index, block in enumerate(stack_of(extended)) if id(block) in new] == added_at
    assert [m.layer_idx for m in extended.modules() if hasattr(m, "layer_idx")] == list(range(len(expected)))
    assert extended.config.num_hidden_layers == len(expected)


def test_two_flan_t5_small_encoder_blocks_count_twice(tmp_path):
    outcome = run(job(preset="flan-t5-small", kind="create", stack="encoder", positions=[4, 8]), tmp_path)
    assert outcome.stats["layer_params"] == outcome.stats["trainable_params"] == 2 * 2_360_320
    saved = json.loads((Path(outcome.layer_path) / "extension.json").read_text())
    assert [block["position"] for block in saved["blocks"]] == [4, 9]


def test_hybrid_trains_every_block_with_lora_on_each_and_reloads(tmp_path):
    spec = job("hybrid", "llama-tiny", expand={"every": 1}, init_scale=0.5)
    outcome = run(spec, tmp_path)
    block = sum(p.numel() for p in base("llama-tiny").model.layers[0].parameters())
    assert outcome.stats["layer_params"] == 2 * block
    # LoRA (r=2) on q,k,v,o of all four blocks: 64 -> 64 (q, o) and 64 -> 32 (k, v, two KV heads)
    assert outcome.stats["lora_params"] == 4 * 2 * (2 * (64 + 64) + 2 * (64 + 32))
    model, _, info = load_job_model(outcome.job_dir)
    assert info["metrics"]["effective_batch_size"] == 4
    fresh = HybridExtension(base("llama-tiny"), ExtensionConfig(layer=spec.layer, lora=LoRASpec(r=2)),
                            DeviceManager("cpu"))
    fresh.build("t")
    reloaded = model.get_base_model().model.layers
    assert len(reloaded) == 4
    for index, initial in zip((1, 3), fresh.new_blocks["t"]):
        # both added blocks trained: their own (non-adapter) weights moved away from the copy
        assert not torch.equal(reloaded[index].mlp.down_proj.weight, initial.mlp.down_proj.weight)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        cached = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        uncached = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[-1] == ids.shape[-1] + 6


def test_layer_job_saves_every_block_and_a_child_builds_on_them(tmp_path):
    parent = run(job(preset="t5-tiny", stack="decoder", positions=[1, 2]), tmp_path, "a1a1a1a1")
    saved = json.loads((Path(parent.layer_path) / "extension.json").read_text())
    assert [(b["source"], b["position"], b["blocks_before"]) for b in saved["blocks"]] == [(1, 1, 2), (2, 3, 3)]
    reloaded, _, _ = load_job_model(parent.job_dir)
    assert len(reloaded.decoder.block) == 4 and reloaded.config.num_decoder_layers == 4
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = reloaded.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape[-1] > 1
    # a job with layer.from (and frozen): the parent's two blocks, at the parent's positions
    child_spec = job(preset="t5-tiny", **{"from": "job:a1a1a1a1", "freeze": True})
    child = TransformerLayerExtension(base("t5-tiny"), ExtensionConfig.from_job_spec(
        child_spec, {"layer": parent.job_dir}), DeviceManager("cpu"))
    model = child.build("t")
    assert len(model.decoder.block) == 4 and len(model.encoder.block) == 2
    for index, block in zip((1, 3), child.new_blocks["t"]):
        assert block is model.decoder.block[index]
        assert torch.equal(block.layer[0].SelfAttention.o.weight, reloaded.decoder.block[index].layer[0].SelfAttention.o.weight)
    assert child.statistics("t").layer_params == 0  # frozen
    assert len(child.origins["t"]["layer"]["placements"]) == 2


@pytest.mark.parametrize("layer,message", [
    ({"positions": [1, 3]}, "layer.positions: 3 is out of range; the decoder stack has 2 blocks, so use indices 0..2"),
    ({"expand": {"every": 3}}, "layer.expand.every: 3 is more than the 2 blocks"),
    ({"positions": [0, 1], "source": "previous"}, "layer.source: previous copies the block before each new block"),
    ({"positions": [1], "source": 2}, "layer.source: block 2 does not exist"),
])
def test_bad_placements_name_the_key_and_the_range(layer, message, device_manager):
    extension = TransformerLayerExtension(base("gpt2-tiny"), ExtensionConfig(layer=LayerSpec(**layer)), device_manager)
    with pytest.raises(ConfigError, match=message):
        extension.build("t")


def test_t5_refuses_a_block_before_its_first(device_manager):
    extension = TransformerLayerExtension(base("t5-tiny"), ExtensionConfig(layer=LayerSpec(positions=[0, 2])),
                                          device_manager)
    with pytest.raises(ConfigError, match="layer.positions: 0 is not possible on t5"):
        extension.build("t")


@pytest.mark.parametrize("layer,message", [
    ({"positions": [1], "position": 1}, "either position"),
    ({"expand": {"every": 2}, "positions": [1]}, "leave positions out"),
    ({"expand": {"every": 0}}, "greater than 0"),
    ({"positions": []}, "at least one"),
    ({"positions": [-1]}, ">= 0"),
    ({"position": 0, "source": "previous"}, "position 0 has none"),
])
def test_conflicting_layer_keys_are_refused_at_validation(layer, message):
    with pytest.raises(ValidationError, match=message):
        LayerSpec(**layer)



def test_batch_files_take_the_new_keys_and_name_a_conflict():
    data = {"batch": "grow", "base_model": "random:llama-tiny",
            "defaults": {"layer": {"position": "end", "init_scale": 0.0}, "train": {"dataset": str(DATA / "reverse.jsonl")}},
            "jobs": [{"task": "two", "extension": "layer", "layer": {"positions": [1, 2], "source": "previous"}},
                     {"task": "pro", "extension": "hybrid", "matrix": {"layer.expand.every": [1, 2]}}]}
    batch = parse_batch(data)
    assert [spec.layer.positions for spec in batch.jobs] == [[1, 2], None, None]
    assert [spec.layer.expand.every for spec in batch.jobs[1:]] == [1, 2]
    data["jobs"][0]["layer"]["position"] = 1
    with pytest.raises(SpecError, match="either position"):
        parse_batch(data)
