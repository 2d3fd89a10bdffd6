"""Extension classes on every family: statistics, identity at init_scale 0, generation, errors,
and the registry through which a new kind runs as a job."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from peft import IA3Config, get_peft_model

from jobs.extensions import EXTENSION_KINDS, register
from jobs.presets import PRESETS
from jobs.spec import SECTION_SPECS, JobSpec, LayerSpec, LoRASpec
from worker.architectures import architecture_for
from worker.device import DeviceManager
from worker.errors import ConfigError
from worker.extensions import (
    BaseExtension,
    ExtensionConfig,
    HybridExtension,
    LoRAExtension,
    TransformerLayerExtension,
    extension_class,
)
from worker.extensions.lora import adapter_name_for
from worker.models import build_random_preset, structural_copy
from worker.pipeline import JobContext, load_job_model, run_job
from worker.stats import adapter_parameters

R = 4  # LoRA rank used throughout


@pytest.fixture(scope="module")
def device_manager():
    return DeviceManager("cpu")


def base(preset: str) -> torch.nn.Module:
    model, _ = build_random_preset(preset)
    return model.eval()


def cfg(preset: str) -> dict:
    return PRESETS[preset]["config"]


# ---- independent parameter counts, from the config alone -------------------------------------

def t5_counts(c: dict) -> dict:
    d, inner, ff, V = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"], c["vocab_size"]
    bias = c["relative_attention_num_buckets"] * c["num_heads"]
    ff_params = (3 if c["feed_forward_proj"].startswith("gated") else 2) * d * ff
    attn = 4 * d * inner + d  # q, k, v, o + layer norm
    enc_block = attn + ff_params + d
    dec_block = 2 * attn + ff_params + d
    base_params = (V * d + c["num_layers"] * enc_block + bias + d
                   + c["num_decoder_layers"] * dec_block + bias + d
                   + (0 if c["tie_word_embeddings"] else V * d))  # as the config says; see flan test
    lora_per_attn = 4 * R * (d + inner)
    return {"base": base_params, "layer": enc_block,
            "lora": lora_per_attn * (c["num_layers"] + 2 * c["num_decoder_layers"]),
            "hybrid_lora": lora_per_attn * (c["num_layers"] + 1 + 2 * c["num_decoder_layers"])}


def gpt2_counts(c: dict) -> dict:
    d, inner, V, P, n = c["n_embd"], c["n_inner"], c["vocab_size"], c["n_positions"], c["n_layer"]
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * inner + inner) + (inner * d + d)
    lora_block = R * (d + 3 * d) + R * (d + d) + R * (inner + d)  # c_attn, attn.c_proj, mlp.c_proj
    return {"base": V * d + P * d + n * block + 2 * d, "layer": block,
            "lora": n * lora_block, "hybrid_lora": (n + 1) * lora_block}


def llama_counts(c: dict) -> dict:
    d, inter, V, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    block = d * q + 2 * d * kv + q * d + 3 * d * inter + 2 * d
    lora_block = R * (d + q) + 2 * R * (d + kv) + R * (q + d)
    return {"base": 2 * V * d + n * block + d, "layer": block, "lora": n * lora_block,
            "hybrid_lora": (n + 1) * lora_block}


def bert_counts(c: dict) -> dict:
    d, inter, V, P, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["max_position_embeddings"], \
        c["num_hidden_layers"]
    block = 4 * (d * d + d) + 2 * d + (d * inter + inter) + (inter * d + d) + 2 * d
    embeddings = V * d + P * d + 2 * d + 2 * d
    head = d * d + d + 2 * d + V  # transform, its LayerNorm, decoder bias (decoder weight tied)
    lora_block = 3 * R * (2 * d)
    return {"base": embeddings + n * block + head, "layer": block, "lora": n * lora_block,
            "hybrid_lora": (n + 1) * lora_block}


COUNTS = {"t5-tiny": t5_counts, "flan-t5-small": t5_counts, "gpt2-tiny": gpt2_counts,
          "llama-tiny": llama_counts, "bert-tiny": bert_counts}
BUILDERS = {"lora": LoRAExtension, "layer": TransformerLayerExtension, "hybrid": HybridExtension}


@pytest.mark.parametrize("preset", ["t5-tiny", "gpt2-tiny", "llama-tiny", "bert-tiny"])
@pytest.mark.parametrize("kind", ["lora", "layer", "hybrid"])
def test_statistics_match_counts_from_config(preset, kind, device_manager):
    expected = COUNTS[preset](cfg(preset))
    extension = BUILDERS[kind](base(preset), ExtensionConfig(lora=LoRASpec(r=R)), device_manager)
    extension.build("task")
    stats = extension.statistics("task").as_dict()
    lora = {"lora": expected["lora"], "layer": 0, "hybrid": expected["hybrid_lora"]}[kind]
    layer = 0 if kind == "lora" else expected["layer"]
    assert stats["base_params"] == expected["base"]
    assert stats["lora_params"] == lora
    assert stats["layer_params"] == layer
    assert stats["total_params"] == expected["base"] + lora + layer
    assert stats["trainable_params"] == lora + layer
    assert stats["trainable_pct"] == pytest.approx(100 * (lora + layer) / expected["base"])
    # the declared groups are what trains
    trains = {id(p) for p in extension.model_for("task").parameters() if p.requires_grad}
    assert trains == {id(p) for group in extension.parameter_groups("task").values() for p in group}


def test_flan_t5_small_is_the_real_architecture(device_manager):
    model = base("flan-t5-small")
    c = model.config
    assert (c.d_model, c.d_kv, c.d_ff, c.num_layers, c.num_decoder_layers, c.num_heads, c.vocab_size) == \
        (512, 64, 1024, 8, 8, 6, 32128)
    assert c.is_gated_act and not c.scale_decoder_outputs  # T5 v1.1: gated-gelu, unscaled decoder output
    # google/flan-t5-small has 76,961,152 parameters with its own lm_head; transformers >= 5 always ties
    # T5's lm_head to the shared embedding, which leaves one 32128 x 512 matrix fewer.
    untied = t5_counts(cfg("flan-t5-small"))["base"]
    assert untied == 76_961_152
    expected = untied - (0 if not c.tie_word_embeddings else 32128 * 512)
    assert sum(p.numel() for p in model.parameters()) == expected


def _logits(model, preset, ids):
    with torch.no_grad():
        if PRESETS[preset]["task_type"] == "seq2seq":
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("preset,stack,position", [
    ("t5-tiny", "encoder", "end"), ("t5-tiny", "encoder", 1), ("t5-tiny", "decoder", "end"),
    ("t5-tiny", "decoder", 1), ("gpt2-tiny", None, "end"), ("gpt2-tiny", None, 0),
    ("llama-tiny", None, "end"), ("llama-tiny", None, 0),
])
def test_init_scale_zero_is_an_exact_identity(preset, stack, position, device_manager):
    model = base(preset)
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _logits(model, preset, ids)
    layer = LayerSpec(stack=stack, position=position, source=0, init_scale=0.0)
    extension = TransformerLayerExtension(model, ExtensionConfig(layer=layer), device_manager)
    extended = extension.create_extended_model("t").eval()
    assert torch.equal(_logits(extended, preset, ids), expected)
    # and the base model it was built from is untouched
    assert torch.equal(_logits(model, preset, ids), expected)


@pytest.mark.parametrize("preset,stack", [("t5-tiny", "decoder"), ("gpt2-tiny", None), ("llama-tiny", None)])
@pytest.mark.parametrize("kind", ["layer", "hybrid"])
def test_extended_models_generate_with_a_consistent_kv_cache(preset, stack, kind, device_manager):
    layer = LayerSpec(stack=stack, position=1, init_scale=1.0)  # a full-strength copy changes the output
    extension = BUILDERS[kind](base(preset), ExtensionConfig(layer=layer, lora=LoRASpec(r=R)), device_manager)
    model = extension.build("t").eval()
    n_blocks = cfg(preset).get("num_decoder_layers") or cfg(preset).get("n_layer") or cfg(preset)["num_hidden_layers"]
    counts = {"num_decoder_layers", "n_layer", "num_hidden_layers"}
    config = model.config
    assert any(getattr(config, key, None) == n_blocks + 1 for key in counts)
    ids = torch.randint(3, 259, (1, 6), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert cached.shape[-1] > (1 if PRESETS[preset]["task_type"] == "seq2seq" else ids.shape[-1])
    assert torch.equal(cached, uncached)


def test_t5_new_block_never_owns_the_relative_attention_bias(device_manager):
    extension = TransformerLayerExtension(base("t5-tiny"), ExtensionConfig(layer=LayerSpec(source=0)),
                                          device_manager)
    model = extension.create_extended_model("t")
    owners = [n for n, _ in model.named_parameters() if "relative_attention_bias" in n]
    assert owners == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]


def test_bert_family_builds_every_kind(device_manager):
    for kind in BUILDERS:
        extension = BUILDERS[kind](base("bert-tiny"), ExtensionConfig(lora=LoRASpec(r=R)), device_manager)
        model = extension.build("t").eval()
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[5, 6, 7]]))
        assert out.logits.shape == (1, 3, 259)


def test_lora_tasks_switch_adapters_on_one_model(device_manager):
    extension = LoRAExtension(base("t5-tiny"), ExtensionConfig(lora=LoRASpec(r=R)), device_manager)
    first = extension.create_adapter("reverse")
    second = extension.create_adapter("uppercase")
    assert first is second
    with torch.no_grad():  # make the two adapters differ
        for name, p in second.named_parameters():
            if "lora_B.task_uppercase" in name:
                p.fill_(0.01)
    ids = torch.tensor([[10, 11, 12]])
    extension.switch("reverse")
    a = _logits(second, "t5-tiny", ids)
    extension.switch("uppercase")
    b = _logits(second, "t5-tiny", ids)
    assert not torch.equal(a, b)
    expected = t5_counts(cfg("t5-tiny"))
    for task in ("reverse", "uppercase"):  # one adapter each, whichever is active
        stats = extension.statistics(task)
        assert (stats.lora_params, stats.trainable_params) == (expected["lora"], expected["lora"])
        assert stats.total_params == expected["base"] + expected["lora"]


def test_hybrid_shared_layer_reuses_one_block(device_manager):
    extension = HybridExtension(base("t5-tiny"), ExtensionConfig(lora=LoRASpec(r=R)), device_manager)
    a = extension.create_hybrid_model("a", use_shared_layer=True)
    b = extension.create_hybrid_model("b", use_shared_layer=True)
    assert a is b and extension.new_blocks["a"][0] is extension.new_blocks["b"][0]
    assert len(a.get_base_model().encoder.block) == 3
    separate = extension.create_hybrid_model("c.v2")  # '.' is fine in a task name, not in a PEFT adapter name
    assert separate is not a
    # another extension object can add its task to the same shared block
    other = HybridExtension(extension.base_model, ExtensionConfig(lora=LoRASpec(r=R)), device_manager)
    d = other.create_hybrid_model("d", use_shared_layer=True, shared_model=a)
    assert d is a and other.new_blocks["d"][0] is extension.new_blocks["a"][0]
    assert "graftq_new_block" not in dict(a.named_modules()) and len(a.get_base_model().encoder.block) == 3


def test_shared_layer_statistics_count_only_that_tasks_adapter(device_manager):
    expected = t5_counts(cfg("t5-tiny"))
    extension = HybridExtension(base("t5-tiny"), ExtensionConfig(lora=LoRASpec(r=R)), device_manager)
    for task in ("a", "b", "c"):
        extension.create_hybrid_model(task, use_shared_layer=True)
    extension.switch("b")
    for task in ("a", "b", "c"):
        stats = extension.statistics(task)
        assert (stats.lora_params, stats.layer_params) == (expected["hybrid_lora"], expected["layer"])
        assert stats.trainable_params == expected["hybrid_lora"] + expected["layer"]
        assert stats.total_params == expected["base"] + expected["hybrid_lora"] + expected["layer"]


@pytest.mark.parametrize("kind", ["layer", "hybrid"])
def test_a_dropped_extended_model_is_freed_without_a_collection(kind, device_manager):
    # a decoder block on T5 makes the model wrap `generate`
    extension = BUILDERS[kind](base("t5-tiny"), ExtensionConfig(layer=LayerSpec(stack="decoder")), device_manager)
    model = extension.build("t")
    transformers_model = weakref.ref(model.get_base_model() if kind == "hybrid" else model)
    gc.disable()  # only reference counting may free it
    try:
        del model, extension
        assert transformers_model() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("kind", ["lora", "layer", "hybrid"])
def test_load_rebuilds_what_save_wrote(kind, tmp_path, device_manager):
    config = ExtensionConfig(layer=LayerSpec(init_scale=1.0), lora=LoRASpec(r=R))
    extension = BUILDERS[kind](base("t5-tiny"), config, device_manager)
    model = extension.build("t").eval()
    with torch.no_grad():  # a LoRA B starts at zero; make the adapter change the output
        for p in adapter_parameters(model):
            p.add_(0.01)
    saved = extension.save("t", tmp_path)
    assert set(saved) == {"lora": {"adapter"}, "layer": {"layer"}, "hybrid": {"adapter", "layer"}}[kind]
    assert all(path.parent == tmp_path and path.is_dir() for path in saved.values())
    reloaded = BUILDERS[kind](extension.base_model, config, device_manager).load("t", tmp_path).eval()
    ids = torch.tensor([[10, 20, 30, 1]])
    assert torch.equal(_logits(reloaded, "t5-tiny", ids), _logits(model, "t5-tiny", ids))
    assert not torch.equal(_logits(model, "t5-tiny", ids), _logits(extension.base_model, "t5-tiny", ids))


def test_presets_carry_their_familys_task_type():
    for name, preset in PRESETS.items():
        assert preset["task_type"] == architecture_for(base(name)).task_type, name


# ---- the registry: a new kind runs as a job without touching the pipeline ---------------------

def test_every_registered_kind_has_a_builder_and_known_sections():
    for name, kind in EXTENSION_KINDS.items():
        assert issubclass(extension_class(name), BaseExtension), name
        assert set(kind.sections) <= set(SECTION_SPECS) - {"train"}, name


class IA3Extension(LoRAExtension):
    """A PEFT method graftq does not ship, registered by the tests below: built as IA3, saved, counted
    and reloaded as LoRA adapters are (PEFT's own format and bookkeeping)."""

    def build(self, task):
        self.peft_model = get_peft_model(structural_copy(self.base_model), IA3Config(
            task_type="SEQ_2_SEQ_LM", target_modules=list(self.arch.default_lora_targets), feedforward_modules=[]),
            adapter_name=adapter_name_for(task))
        return self._remember(task, self.peft_model, [])


@pytest.fixture
def ia3_kind():
    kind = register("ia3-test", (), f"{__name__}:IA3Extension")
    yield kind.name
    del EXTENSION_KINDS[kind.name]


def test_registering_a_kind_twice_is_an_error(ia3_kind):
    with pytest.raises(ValueError, match="'ia3-test' is registered twice"):
        register(ia3_kind, ("lora",), "worker.extensions.lora:LoRAExtension")
    assert EXTENSION_KINDS[ia3_kind].sections == ()


def test_a_registered_kind_is_built_saved_and_counted_by_the_pipeline(ia3_kind, tmp_path):
    spec = JobSpec(task="reverse", kind="create", extension=ia3_kind, base_model="random:t5-tiny", device="cpu",
                   lora={"r": 4}, layer={})
    assert spec.lora is None and spec.layer is None  # sections the kind does not read are dropped
    outcome = run_job(JobContext(job_id="job1", batch_id="batch1", spec=spec, artifacts_root=tmp_path))
    c, expected = cfg("t5-tiny"), t5_counts(cfg("t5-tiny"))
    attentions = c["num_layers"] + 2 * c["num_decoder_layers"]
    ia3 = attentions * (3 * c["num_heads"] * c["d_kv"] + c["d_model"])  # one scale per q, k, v, o output
    assert outcome.stats["lora_params"] == outcome.stats["trainable_params"] == ia3
    assert outcome.stats["total_params"] == expected["base"] + ia3 and outcome.stats["layer_params"] == 0
    assert outcome.layer_path is None
    adapter = json.loads(Path(outcome.adapter_path, "adapter_config.json").read_text())
    assert adapter["peft_type"] == "IA3" and Path(outcome.adapter_path).parent == Path(outcome.job_dir)
    model, _, _ = load_job_model(outcome.job_dir)  # the kind reloads what it saved
    assert sum(p.numel() for p in adapter_parameters(model)) == ia3


# ---- errors that name the key and the fix ----------------------------------------------------

def test_unknown_target_module_lists_the_linear_modules(device_manager):
    extension = LoRAExtension(base("t5-tiny"), ExtensionConfig(lora=LoRASpec(target_modules=["q", "qkv"])),
                              device_manager)
    with pytest.raises(ConfigError) as error:
        extension.create_adapter("t")
    message = str(error.value)
    assert "lora.target_modules" in message and "'qkv'" in message
    assert "q, v, wi, wo" in message  # the model's Linear module names


@pytest.mark.parametrize("layer,key,hint", [
    (LayerSpec(stack="decoder"), "layer.stack", "encoder"),
    (LayerSpec(position=7), "layer.position", "0..2"),
    (LayerSpec(source=5), "layer.source", "0..1"),
    (LayerSpec(position=0), "layer.position", "1 or more"),
])
def test_bad_layer_settings_name_key_and_range(layer, key, hint, device_manager):
    preset = "gpt2-tiny" if layer.stack == "decoder" and False else "t5-tiny"
    if key == "layer.stack":
        preset = "llama-tiny"
        layer = LayerSpec(stack="encoder")
    extension = TransformerLayerExtension(base(preset), ExtensionConfig(layer=layer), device_manager)
    with pytest.raises(ConfigError) as error:
        extension.create_extended_model("t")
    assert key in str(error.value) and hint in str(error.value)
