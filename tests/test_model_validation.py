"""Validation against the base model's config.json, without torch: a missing model directory, target
modules the architecture lacks, block indices beyond its stacks, a generation length beyond its positions.
Each is one line naming the job and the key, and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from jobs.batch import parse_batch
from jobs.cli import cli
from jobs.errors import SpecError
from jobs.model_config import FAMILIES, BaseConfig, linear_module_names
from jobs.presets import PRESETS

#: model types the worker supports that no preset covers, as tiny configs
EXTRA_CONFIGS = {
    "t5-gated": {"model_type": "t5", "vocab_size": 64, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 2,
                 "num_decoder_layers": 3, "num_heads": 2, "feed_forward_proj": "gated-gelu"},
    "mt5": {"model_type": "mt5", "vocab_size": 64, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 1,
            "num_heads": 2},
    "qwen2": {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1},
}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"input": word, "target": word[::-1]}) + "\n" for word in ("abc", "de")))
    return path


def problems(data: Path, *jobs: dict, base: str = "random:t5-tiny") -> list[str]:
    """The problem lines of a batch of `jobs` (each a lora job on `base` unless it says otherwise)."""
    document = {"base_model": base, "defaults": {"extension": "lora", "train": {"dataset": str(data)}},
                "jobs": [{"task": f"t{index}", **job} for index, job in enumerate(jobs)]}
    try:
        parse_batch(document)
    except SpecError as error:
        return error.problems
    return []


# --- the module-name table is the real models' ----------------------------------------------------


def test_every_family_the_worker_supports_has_an_entry_that_agrees():
    from worker.architectures import ARCHITECTURES

    assert set(FAMILIES) == set(ARCHITECTURES)
    for model_type, family in FAMILIES.items():
        arch = ARCHITECTURES[model_type]
        assert family.task_type == arch.task_type and family.default_stack == arch.default_stack, model_type
        assert {stack: key for stack, (_, key) in family.stacks.items()} == arch.layer_count_keys, model_type
        assert all(path in arch.stacks[stack] for stack, (path, _) in family.stacks.items()), model_type
        assert family.first_block_owns_position_bias == arch.first_block_owns_position_bias, model_type


@pytest.mark.parametrize("name", [*(name for name in PRESETS if name != "flan-t5-small"), *EXTRA_CONFIGS])
def test_the_linear_module_names_are_those_of_the_model_the_worker_builds(name):
    import transformers

    from jobs.metrics import OBJECTIVES_BY_TASK_TYPE
    from worker.extensions.lora import _linear_modules
    from worker.models import auto_class

    config_dict = PRESETS[name]["config"] if name in PRESETS else EXTRA_CONFIGS[name]
    config = transformers.AutoConfig.for_model(**config_dict)
    family = FAMILIES[config.model_type]
    for objective in (None, *OBJECTIVES_BY_TASK_TYPE[family.task_type]):
        model = auto_class(family.task_type, objective).from_config(config)
        expected = sorted(_linear_modules(model))
        assert sorted(linear_module_names(BaseConfig(name, dict(config_dict)), objective)) == expected


# --- presets --------------------------------------------------------------------------------------


def test_a_valid_batch_passes(data):
    assert problems(data, {"lora": {"target_modules": ["q", "v", "DenseReluDense.wo", "decoder.block.1.layer.1.EncDecAttention.k"]}},
                    {"extension": "layer", "layer": {"stack": "decoder", "position": 2, "source": -2}},
                    {"extension": "hybrid-ia3", "ia3": {"target_modules": ["k", "wo"], "feedforward_modules": ["wo"]}},
                    {"extension": "layer", "layer": {"positions": [1, 2, 2]}},
                    {"train": {"dataset": str(data), "max_new_tokens": 8192}}) == []  # T5: relative positions


def test_each_refusal_names_the_job_the_key_and_the_fix(data):
    found = problems(
        data,
        {"lora": {"target_modules": ["q", "q_proj"]}},
        {"extension": "loha", "loha": {"target_modules": ["query"]}},
        {"extension": "layer", "layer": {"position": 3}},
        {"extension": "layer", "layer": {"stack": "decoder", "source": 2}},
        {"extension": "hybrid", "layer": {"positions": [0, 5]}},
        {"extension": "layer", "layer": {"expand": {"every": 3}}},
    )
    assert found == [
        "job 0 (task 't0'): key `lora.target_modules`: no Linear module named 'q_proj' in random:t5-tiny (t5); its "
        "Linear modules are: k, lm_head, o, q, v, wi, wo. Fix the name(s), or leave target_modules out for the "
        "family's default",
        "job 1 (task 't1'): key `loha.target_modules`: no Linear module named 'query' in random:t5-tiny (t5); its "
        "Linear modules are: k, lm_head, o, q, v, wi, wo. Fix the name(s), or leave target_modules out for the "
        "family's default",
        "job 2 (task 't2'): key `layer.position`: 3 is out of range: the encoder stack of random:t5-tiny has 2 "
        "blocks, so use 0..2 or end",
        "job 3 (task 't3'): key `layer.source`: block 2 does not exist: the decoder stack of random:t5-tiny has 2 "
        "blocks, so use 0..1 (or -1 for the last, or previous)",
        "job 4 (task 't4'): key `layer.positions`: 5 out of range: the encoder stack of random:t5-tiny has 2 blocks, "
        "so use indices 0..2 (2 = after the last block)",
        "job 4 (task 't4'): key `layer.positions`: 0 is not possible on t5: its first block owns the relative "
        "attention bias that every block shares; use a position of 1 or more",
        "job 5 (task 't5'): key `layer.expand.every`: 3 is more than 2 (the encoder stack of random:t5-tiny has 2 "
        "blocks); use 1..2",
    ]


def test_decoder_only_and_bart_stacks_and_position_limits(data):
    gpt2 = problems(data, {"train": {"dataset": str(data), "max_new_tokens": 513}},
                    {"extension": "layer", "layer": {"stack": "encoder"}},
                    {"lora": {"target_modules": ["mlp.c_proj", "attn.c_attn"]},
                     "train": {"dataset": str(data), "max_new_tokens": 512}},
                    base="random:gpt2-tiny")
    assert gpt2 == [
        "job 0 (task 't0'): key `train.max_new_tokens`: 513 is more than the 512 positions random:gpt2-tiny (gpt2) "
        "was built for; use at most 512",
        "job 1 (task 't1'): key `layer.stack`: random:gpt2-tiny (gpt2) has no encoder stack; use decoder",
    ]
    # BART: two stacks, learned positions
    assert problems(data, {"extension": "layer", "layer": {"stack": "decoder", "position": 2}},
                    {"train": {"dataset": str(data), "max_new_tokens": 512}}, base="random:bart-tiny") == []
    bart = problems(data, {"extension": "layer", "layer": {"stack": "decoder", "position": 3}},
                    {"train": {"dataset": str(data), "max_new_tokens": 600}}, base="random:bart-tiny")
    assert "key `layer.position`: 3 is out of range: the decoder stack of random:bart-tiny has 2 blocks" in bart[0]
    assert "key `train.max_new_tokens`: 600 is more than the 512 positions random:bart-tiny (bart)" in bart[1]


def test_a_classifier_has_its_head_and_an_adapter_from_another_job_keeps_its_targets(data):
    labels = data.with_name("labels.jsonl")
    labels.write_text('{"input": "a", "label": "x"}\n{"input": "b", "label": "y"}\n')
    assert problems(labels, {"lora": {"target_modules": ["query", "classifier"]}}, base="random:bert-tiny") == []
    # a create job builds the model a train job would: the classifier, not the masked-LM head
    assert "no Linear module named 'cls.predictions.decoder'" in problems(
        labels, {"kind": "create", "lora": {"target_modules": ["classifier", "cls.predictions.decoder"]}},
        base="random:bert-tiny")[0]
    assert problems(data, {"name": "first"}, {"needs": ["first"], "lora": {"from": "first", "target_modules": ["x"]}}) \
        == []


# --- local directories and the Hugging Face cache -----------------------------------------------


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory) -> Path:
    from worker.models import build_random_preset, save_base_model

    return save_base_model(*build_random_preset("gpt2-tiny"), tmp_path_factory.mktemp("models") / "my-gpt2")


def test_a_saved_model_directory_is_checked_like_its_preset(data, saved_gpt2):
    assert problems(data, {"lora": {"target_modules": ["c_attn"]}}, base=str(saved_gpt2)) == []
    found = problems(data, {"lora": {"target_modules": ["q"]}},
                     {"extension": "layer", "layer": {"position": 4}},
                     {"train": {"dataset": str(data), "max_new_tokens": 1000}}, base=str(saved_gpt2))
    assert [line.split(": ")[1] for line in found] == ["key `lora.target_modules`", "key `layer.position`",
                                                      "key `train.max_new_tokens`"]
    assert f"in {saved_gpt2} (gpt2)" in found[0] and "the decoder stack of" in found[1]


def test_a_missing_or_empty_model_directory_is_refused(data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert problems(data, {}, base=str(tmp_path / "nowhere")) == [
        f"job 0 (task 't0'): key `base_model`: the local model directory '{tmp_path / 'nowhere'}' does not exist "
        "(relative paths are read from the directory graftq runs in); fix the path, or give a hub id or "
        "random:<preset> (examples/quickstart.yaml's is made by `python scripts/pretrain_demo_base.py`)"]
    assert "has no config.json, so it is not a saved model" in problems(data, {}, base=str(empty))[0]
    assert "does not exist" in problems(data, {}, base="./models/nothing")[0]


def test_hub_models_are_read_from_the_local_cache_and_left_to_the_worker_otherwise(data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-llama"
    (repo / "snapshots" / "0a1b2c").mkdir(parents=True)
    (repo / "snapshots" / "0a1b2c" / "config.json").write_text(json.dumps(PRESETS["llama-tiny"]["config"]))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0a1b2c")

    found = problems(data, {"lora": {"target_modules": ["q_proj", "c_attn"]}},
                     {"extension": "layer", "layer": {"source": 5}}, base="someone/tiny-llama")
    assert [line.split(": ")[1] for line in found] == ["key `lora.target_modules`", "key `layer.source`"]
    assert "'c_attn' in someone/tiny-llama (llama)" in found[0]
    # not in the cache: the worker loads it (and says it is missing); what was checked before still is
    assert problems(data, {"lora": {"target_modules": ["anything"]}}, base="someone/uncached") == []


# --- through the CLI ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("submit", "--dry-run"), ("submit",), ("run",)])
def test_the_cli_refuses_before_writing_anything(command, data, tmp_path):
    batch = tmp_path / "batch.yaml"
    batch.write_text(yaml.safe_dump({"base_model": "random:gpt2-tiny", "jobs": [
        {"task": "a", "extension": "lora", "lora": {"target_modules": ["q"]}, "train": {"dataset": str(data)}},
        {"task": "b", "extension": "layer", "layer": {"position": 9}, "train": {"dataset": str(data)}},
    ]}))
    database = tmp_path / "graftq.db"
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{database}", "--broker-url",
                                      "redis://127.0.0.1:1/0", "--artifacts-dir", str(tmp_path / "artifacts"),
                                      *command, str(batch)])
    assert result.exit_code == 1
    assert result.output.splitlines()[:3] == [
        "Error: 2 problems in the batch file:",
        "  job 0 (task 'a'): key `lora.target_modules`: no Linear module named 'q' in random:gpt2-tiny (gpt2); "
        "its Linear modules are: c_attn, c_fc, c_proj, lm_head. Fix the name(s), or leave target_modules out for "
        "the family's default",
        "  job 1 (task 'b'): key `layer.position`: 9 is out of range: the decoder stack of random:gpt2-tiny has 2 "
        "blocks, so use 0..2 or end",
    ]
    assert not database.exists() and not (tmp_path / "artifacts").exists()
