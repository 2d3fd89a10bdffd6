"""Jobs built on other jobs' artifacts (`layer.from`, `layer.freeze`, `lora.from`) and dataset
mixtures: the pipeline function with the parents' directories handed in, and once through the task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from db.queries import get_job
from db.session import clear_cache, get_database
from db.submission import create_batch
from jobs.spec import JobSpec, LayerSpec, TrainSpec
from worker.data import read_mixture, read_rows, tokenize
from worker.device import DeviceManager
from worker.errors import ConfigError, JobCancelled, JobError
from worker.extensions import ExtensionConfig, HybridExtension, LoRAExtension, TransformerLayerExtension
from worker.extensions.layer import block_state_dict
from worker.extensions.lora import adapter_name_for
from worker.models import build_random_preset
from worker.pipeline import JobContext, load_job_model, run_job
from worker.stats import own_parameters
from worker.tokenizer import ByteTokenizer
from worker.training import Trainer

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
TASKS = ("reverse.jsonl", "uppercase.jsonl", "sort_digits.jsonl")
LAYER_PARENT, LORA_PARENT, HYBRID_PARENT = "a1a1a1a1", "b2b2b2b2", "c3c3c3c3"


def make_spec(extension: str, preset: str = "t5-tiny", kind: str = "train", steps: int = 3, **sections) -> JobSpec:
    train = {"dataset": str(DATA / "reverse.jsonl"), "max_steps": steps, "batch_size": 8, "learning_rate": 3e-3,
             "checkpoint_every": 0}
    return JobSpec.model_validate({"task": "t", "kind": kind, "extension": extension, "base_model": f"random:{preset}",
                                   "device": "cpu", "train": train if kind == "train" else None,
                                   "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **sections})


def run(spec: JobSpec, root: Path, job_id: str, needed: dict[str, Path] | None = None, **ctx):
    return run_job(JobContext(job_id=job_id, batch_id="b", spec=spec, artifacts_root=root,
                              needed_dirs=needed or {}, **ctx))


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict[str, Path]:
    """A trained layer, lora and hybrid job on random:t5-tiny: {job id: job directory}."""
    root = tmp_path_factory.mktemp("parents")
    built = {job_id: run(make_spec(kind), root, job_id)
             for job_id, kind in ((LAYER_PARENT, "layer"), (LORA_PARENT, "lora"), (HYBRID_PARENT, "hybrid"))}
    return {job_id: Path(outcome.job_dir) for job_id, outcome in built.items()}


def record_builds(monkeypatch, cls) -> list[dict]:
    """Snapshot what each `cls.build` made, before anything trains: the added block's weights and
    whether they train, and the task's adapter weights (in PEFT's saved key format)."""
    snapshots: list[dict] = []
    original = cls.build

    def build(self, task, *args, **kwargs):
        model = original(self, task, *args, **kwargs)
        snapshot = {}
        if self.new_blocks[task]:
            block = self.new_blocks[task][0]
            snapshot["block"] = {k: v.clone() for k, v in block_state_dict(block).items()}
            snapshot["block_trains"] = {p.requires_grad for p in own_parameters(block)}
        if isinstance(model, PeftModel):
            state = get_peft_model_state_dict(model, adapter_name=adapter_name_for(task), save_embedding_layers=False)
            snapshot["adapter"] = {k: v.detach().clone() for k, v in state.items()}
        snapshots.append(snapshot)
        return model

    monkeypatch.setattr(cls, "build", build)
    return snapshots


def saved_block(job_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(job_dir) / "layer" / "layer.safetensors"))


def saved_adapter(job_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(job_dir) / "adapter" / "adapter_model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Tensor for tensor equal (the same names, shapes, dtypes and values)."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ---- layer.from ---------------------------------------------------------------------------------

def test_a_layer_job_continues_training_the_block_its_parent_saved(parents, tmp_path, monkeypatch):
    builds = record_builds(monkeypatch, TransformerLayerExtension)
    # the child's own placement keys are ignored (position 0 would even be refused on T5)
    spec = make_spec("layer", layer={"from": f"job:{LAYER_PARENT}", "stack": "decoder", "position": 0})
    outcome = run(spec, tmp_path, "d4d4d4d4", {LAYER_PARENT: parents[LAYER_PARENT]})
    assert same(builds[0]["block"], saved_block(parents[LAYER_PARENT])) and builds[0]["block_trains"] == {True}
    assert not same(saved_block(outcome.job_dir), saved_block(parents[LAYER_PARENT]))  # it trained on
    parent_placement = json.loads((parents[LAYER_PARENT] / "layer" / "extension.json").read_text())
    assert json.loads(Path(outcome.layer_path, "extension.json").read_text()) == parent_placement
    started = json.loads(Path(outcome.job_dir, "job.json").read_text())["started_from"]
    assert started["layer"]["from"] == f"job:{LAYER_PARENT}" and started["layer"]["frozen"] is False
    assert started["layer"]["placement"]["stack"] == "encoder"
    assert outcome.stats["layer_params"] == outcome.stats["trainable_params"] > 0


@pytest.mark.parametrize("freeze", [True, False])
def test_a_hybrid_job_adds_its_lora_on_the_parents_block_and_trains_it_unless_frozen(parents, tmp_path,
                                                                                      monkeypatch, freeze):
    builds = record_builds(monkeypatch, HybridExtension)
    spec = make_spec("hybrid", layer={"from": f"job:{LAYER_PARENT}", "freeze": freeze})
    outcome = run(spec, tmp_path, "e5e5e5e5", {LAYER_PARENT: parents[LAYER_PARENT]})
    start, parent_block = builds[0], saved_block(parents[LAYER_PARENT])
    assert same(start["block"], parent_block)
    assert start["block_trains"] == {not freeze}
    assert same(saved_block(outcome.job_dir), parent_block) is freeze
    trained_adapter = saved_adapter(outcome.job_dir)
    assert trained_adapter.keys() == start["adapter"].keys() and not same(trained_adapter, start["adapter"])
    stats = outcome.stats
    assert stats["trainable_params"] == stats["lora_params"] + stats["layer_params"]
    assert (stats["layer_params"] == 0) is freeze


def test_a_frozen_block_is_counted_in_the_total_only(parents, tmp_path):
    needed = {LAYER_PARENT: parents[LAYER_PARENT]}
    frozen, trained = (run(make_spec("hybrid", kind="create", layer={"from": f"job:{LAYER_PARENT}", "freeze": freeze}),
                           tmp_path, job_id, needed).stats
                       for job_id, freeze in (("f6f6f6f6", True), ("f7f7f7f7", False)))
    block = sum(t.numel() for t in saved_block(parents[LAYER_PARENT]).values())
    assert trained["layer_params"] == block and frozen["layer_params"] == 0
    assert frozen["trainable_params"] == frozen["lora_params"] == trained["lora_params"]
    assert frozen["total_params"] == trained["total_params"] == trained["base_params"] + block + trained["lora_params"]


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_frozen_block_statistics_on_a_decoder_family(preset, tmp_path):
    parent = run(make_spec("layer", preset, kind="create"), tmp_path, "a0a0a0a0")
    block = parent.stats["layer_params"]
    child = run(make_spec("hybrid", preset, kind="create", layer={"from": "job:a0a0a0a0", "freeze": True}),
                tmp_path, "a9a9a9a9", {"a0a0a0a0": Path(parent.job_dir)}).stats
    assert child["layer_params"] == 0 and child["trainable_params"] == child["lora_params"] > 0
    assert child["total_params"] == child["base_params"] + block + child["lora_params"]
    assert child["trainable_pct"] == pytest.approx(100 * child["lora_params"] / child["base_params"])


def test_a_frozen_block_child_reloads_and_resumes_without_surprises(parents, tmp_path):
    """The child's artifacts stand alone (its parent's directory gone, it still loads and generates),
    and an interrupted child resumes from its checkpoint with the block taken from its parent again."""
    parent_dir = tmp_path / "parent-copy"
    shutil.copytree(parents[LAYER_PARENT], parent_dir)
    spec = make_spec("hybrid", steps=4, layer={"from": f"job:{LAYER_PARENT}", "freeze": True})
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"checkpoint_every": 2})})
    steps = []
    with pytest.raises(JobCancelled):
        run(spec, tmp_path, "abab0001", {LAYER_PARENT: parent_dir}, progress_interval=0,
            on_progress=lambda p: steps.append(p.step), should_cancel=lambda: len(steps) >= 4)
    resumed = run(spec, tmp_path, "abab0001", {LAYER_PARENT: parent_dir})
    straight = run(spec, tmp_path, "abab0002", {LAYER_PARENT: parent_dir})
    assert json.loads(Path(resumed.job_dir, "job.json").read_text())["metrics"]["resumed_from_step"] == 2
    assert resumed.metrics["train_loss"] == pytest.approx(straight.metrics["train_loss"], rel=1e-5)
    assert same(saved_block(resumed.job_dir), saved_block(parents[LAYER_PARENT]))

    shutil.rmtree(parent_dir)
    model, tokenizer, info = load_job_model(resumed.job_dir)
    assert info["started_from"]["layer"]["frozen"] is True
    assert len(model.get_base_model().encoder.block) == 3
    assert same(block_state_dict(model.get_base_model().encoder.block[2]), saved_block(parents[LAYER_PARENT]))
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([tokenizer.encode("abc", 16) + [tokenizer.eos_token_id]]),
                                   max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 1


# ---- lora.from ----------------------------------------------------------------------------------

def test_a_lora_job_starts_from_its_parents_adapter_with_its_settings(parents, tmp_path, monkeypatch):
    builds = record_builds(monkeypatch, LoRAExtension)
    spec = make_spec("lora", lora={"from": f"job:{LORA_PARENT}", "r": 2, "target_modules": ["q"]})
    outcome = run(spec, tmp_path, "bcbc0001", {LORA_PARENT: parents[LORA_PARENT]})
    parent_adapter = saved_adapter(parents[LORA_PARENT])
    assert same(builds[0]["adapter"], parent_adapter)
    trained = saved_adapter(outcome.job_dir)
    assert trained.keys() == parent_adapter.keys() and not same(trained, parent_adapter)
    config = json.loads(Path(outcome.adapter_path, "adapter_config.json").read_text())
    assert (config["r"], sorted(config["target_modules"])) == (4, ["k", "o", "q", "v"])  # the parent's
    started = json.loads(Path(outcome.job_dir, "job.json").read_text())["started_from"]["lora"]
    assert started["from"] == f"job:{LORA_PARENT}" and started["settings"]["r"] == 4
    assert started["settings_from"].endswith("adapter_config.json")
    assert outcome.stats["lora_params"] == sum(t.numel() for t in parent_adapter.values())


def test_a_hybrid_job_starts_from_its_parents_block_and_adapter(parents, tmp_path, monkeypatch):
    builds = record_builds(monkeypatch, HybridExtension)
    ref = f"job:{HYBRID_PARENT}"
    outcome = run(make_spec("hybrid", layer={"from": ref}, lora={"from": ref}), tmp_path, "cdcd0001",
                  {HYBRID_PARENT: parents[HYBRID_PARENT]})
    assert same(builds[0]["block"], saved_block(parents[HYBRID_PARENT]))
    assert same(builds[0]["adapter"], saved_adapter(parents[HYBRID_PARENT]))
    assert not same(saved_adapter(outcome.job_dir), saved_adapter(parents[HYBRID_PARENT]))
    assert set(json.loads(Path(outcome.job_dir, "job.json").read_text())["started_from"]) == {"layer", "lora"}


# ---- what is refused ----------------------------------------------------------------------------

def test_from_is_refused_where_it_cannot_work(parents, tmp_path):
    base_model, _ = build_random_preset("t5-tiny")
    with pytest.raises(ConfigError, match=r"^layer\.from: a LoRAExtension cannot start from"):
        LoRAExtension(base_model, ExtensionConfig(start_from={"layer": parents[LAYER_PARENT]}))
    with pytest.raises(ConfigError, match=r"^lora\.from: .* set layer\.from to the same job"):
        HybridExtension(base_model, ExtensionConfig(start_from={"lora": parents[HYBRID_PARENT]}))
    with pytest.raises(ConfigError, match=r"^layer\.freeze: only a block loaded from another job"):
        HybridExtension(base_model, ExtensionConfig(layer=LayerSpec(freeze=True)), DeviceManager("cpu")).build("t")
    with pytest.raises(ConfigError, match=rf"^layer\.from: job directory {parents[LORA_PARENT]} holds no trained block"):
        run(make_spec("hybrid", layer={"from": f"job:{LORA_PARENT}"}), tmp_path, "dede0001",
            {LORA_PARENT: parents[LORA_PARENT]})
    with pytest.raises(ConfigError, match=r"^lora\.from: .* holds no adapter"):
        run(make_spec("lora", lora={"from": f"job:{LAYER_PARENT}"}), tmp_path, "dede0002",
            {LAYER_PARENT: parents[LAYER_PARENT]})
    with pytest.raises(JobError, match=rf"^layer\.from: the artifacts of job {LAYER_PARENT} were not handed"):
        run(make_spec("layer", layer={"from": f"job:{LAYER_PARENT}"}), tmp_path, "dede0003")
    assert not (tmp_path / "b").exists()  # nothing written


def test_the_task_hands_a_child_its_parents_directory_and_refuses_an_unfinished_parent(sqlite_url, tmp_path):
    from jobs.settings import Settings
    from worker.tasks import execute_job

    def record(name: str, specs: list[JobSpec]) -> list[str]:
        rows = [{"task": s.task, "kind": s.kind.value, "extension": s.extension, "base_model": s.base_model,
                 "queue": "graftq", "spec": s.to_json()} for s in specs]
        with database.begin() as connection:
            return create_batch(connection, name, rows)[1]

    database = get_database(sqlite_url)
    settings = Settings(database_url=sqlite_url, artifacts_dir=tmp_path / "artifacts")
    [parent] = record("parent", [make_spec("layer", kind="create")])
    child = make_spec("hybrid", steps=2, layer={"from": f"job:{parent}", "freeze": True})
    early, later = record("children", [child, child])
    assert execute_job(early, settings, worker="w") == "failed"
    assert execute_job(parent, settings, worker="w") == "succeeded"
    assert execute_job(later, settings, worker="w") == "succeeded"
    with database.read() as connection:
        assert get_job(connection, early).error == (f"layer.from: job {parent} is queued; a job can only build on "
                                                   "the artifacts of a job that succeeded")
        parent_dir, child_row = get_job(connection, parent).job_dir, get_job(connection, later)
    assert child_row.layer_params == 0 and same(saved_block(child_row.job_dir), saved_block(parent_dir))
    assert json.loads(Path(child_row.job_dir, "job.json").read_text())["started_from"]["layer"]["job_dir"] == parent_dir
    clear_cache()


# ---- mixtures -----------------------------------------------------------------------------------

def test_a_mixture_trains_on_the_rows_of_all_its_files(tmp_path):
    files = [DATA / name for name in TASKS]
    rows = read_mixture(files)
    assert rows == [row for file in files for row in read_rows(file)]
    spec = TrainSpec(dataset=[str(file) for file in files], max_steps=1, eval_fraction=0.25)
    model, _ = build_random_preset("t5-tiny")
    trainer = Trainer(model.requires_grad_(True), ByteTokenizer(), "seq2seq", spec, DeviceManager("cpu"))
    trainer.setup()
    assert len(trainer.train_set) + len(trainer.eval_set) == len(rows) == 1200
    # the seeded split draws from every file: each task's targets show up in the held-out rows
    held_out = {tuple(example.labels) for example in trainer.eval_set}
    for name in TASKS:
        examples = tokenize(read_rows(DATA / name), ByteTokenizer(), "seq2seq", spec.max_length)
        assert held_out & {tuple(example.labels) for example in examples}, name
    with pytest.raises(JobError, match=r"train\.dataset: file '.*missing\.jsonl' does not exist"):
        read_mixture([files[0], tmp_path / "missing.jsonl"])
