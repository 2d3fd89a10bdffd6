"""Packed training: jobs trained together on one base equal the same jobs trained alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.spec import JobSpec
from worker.packing import pack_key, run_pack
from worker.pipeline import JobContext, run_job

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"

#: fp32 on CPU: the concatenated, padded forward pass differs from a job's own only by float rounding
ATOL = 1e-5


def spec(preset: str, dataset: str = "reverse", seed: int = 0, **train) -> JobSpec:
    lora = train.pop("lora", {"r": 4, "alpha": 8, "dropout": 0.1})
    # 12 held-out rows: enough for the samples and metrics to tell the jobs' generations apart
    settings = {"dataset": str(EXAMPLES / f"{dataset}.jsonl"), "max_steps": 3, "batch_size": 4,
                "learning_rate": 1e-3, "seed": seed, "max_length": 64, "eval_fraction": 0.03, **train}
    return JobSpec(task=dataset, kind="train", extension="lora", base_model=f"random:{preset}", device="cpu",
                   lora=lora, train=settings)


def context(job_spec: JobSpec, root: Path, job_id: str) -> JobContext:
    return JobContext(job_id=job_id, batch_id="batch1", spec=job_spec, artifacts_root=root)


def weights(job_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(job_dir) / "adapter" / "adapter_model.safetensors"))


def assert_same(packed, alone) -> None:
    assert [point[:2] for point in packed.loss_curve] == [point[:2] for point in alone.loss_curve]
    for (_, _, a), (_, _, b) in zip(packed.loss_curve, alone.loss_curve):
        assert a == pytest.approx(b, abs=ATOL)
    ours, theirs = weights(packed.job_dir), weights(alone.job_dir)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=ATOL, rtol=0)
    assert packed.stats == alone.stats
    # the metrics and samples come from generations of all the pack's jobs together, each its own
    assert packed.samples and packed.samples == alone.samples
    assert packed.task_metrics == pytest.approx(alone.task_metrics, abs=1e-9)


@pytest.mark.parametrize("preset", ["t5-tiny", "gpt2-tiny", "llama-tiny"])
def test_packed_jobs_equal_the_same_jobs_trained_alone(preset, tmp_path, one_torch_thread):
    specs = [
        spec(preset, "reverse", seed=0),
        # generations stop after 5 tokens, the others' after the longest eval target + 8
        spec(preset, "uppercase", seed=1, learning_rate=3e-3, max_steps=2, batch_size=3, max_new_tokens=5,
             lr_scheduler="constant", lora={"r": 2, "alpha": 4, "dropout": 0.0}),
        spec(preset, "sort_digits", seed=2, grad_accum_steps=2, max_steps=4, batch_size=2),
    ]
    assert len({pack_key(s) for s in specs}) == 1
    outcomes: dict[int, object] = {}
    run_pack([context(s, tmp_path / "packed", f"job{i}") for i, s in enumerate(specs)],
             lambda index, outcome: outcomes.__setitem__(index, outcome))
    assert sorted(outcomes) == [0, 1, 2]
    for index, job_spec in enumerate(specs):
        assert not isinstance(outcomes[index], BaseException), outcomes[index]
        alone = run_job(context(job_spec, tmp_path / "alone", f"job{index}"))
        assert_same(outcomes[index], alone)


PACK_BATCH = """
batch: pack-test
base_model: random:gpt2-tiny
defaults:
  lora: {r: 2, alpha: 4, dropout: 0.05}
  train: {dataset: DATA/reverse.jsonl, max_steps: 2, batch_size: 2, max_length: 32}
jobs:
  - {task: a, extension: lora}
  - {task: b, extension: lora, train: {seed: 1, dataset: DATA/uppercase.jsonl, max_steps: 3}}
  - {task: c, extension: lora, lora: {r: 4}}
  - {task: d, extension: layer}
"""


def test_graftq_run_pack_trains_compatible_jobs_together_and_records_who_with(tmp_path, one_torch_thread,
                                                                               monkeypatch):
    from click.testing import CliRunner

    from db.queries import get_job
    from db.session import clear_cache, get_database
    from jobs.cli import cli

    monkeypatch.delenv("GRAFTQ_PACK", raising=False)
    batch = tmp_path / "batch.yaml"
    batch.write_text(PACK_BATCH.replace("DATA", str(EXAMPLES)))
    url = f"sqlite:///{tmp_path / 'graftq.db'}"
    result = CliRunner().invoke(cli, ["--database-url", url, "--artifacts-dir", str(tmp_path / "art"),
                                      "run", str(batch), "--pack", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    monkeypatch.delenv("GRAFTQ_PACK", raising=False)
    database = get_database(url)
    with database.read() as connection:
        from sqlalchemy import select

        from db.tables import jobs as jobs_table

        ids = list(connection.scalars(select(jobs_table.c.id).order_by(jobs_table.c.created_at, jobs_table.c.id)))
        rows = {get_job(connection, i).task: get_job(connection, i) for i in ids}
    clear_cache()
    assert {row.status for row in rows.values()} == {"succeeded"}
    lora = [rows[task] for task in "abc"]
    packed = [row for row in lora if row.packed_with]
    # --pack 2: two of the three lora jobs train together, the third alone (no compatible job left)
    assert len(packed) == 2 and packed[0].packed_with == [packed[1].id] and packed[1].packed_with == [packed[0].id]
    assert rows["d"].packed_with is None  # a layer job never packs
    assert [row.steps for row in lora] == [2, 3, 2]


@pytest.mark.parametrize("preset", ["t5-tiny", "gpt2-tiny"])
def test_packed_evaluation_and_generation_give_each_job_its_own_adapter(preset, tmp_path, one_torch_thread):
    """The final evaluation and the generations for the task metrics run all jobs' rows in one pass:
    each job's loss, metrics and samples equal those of its adapter alone on the shared model."""
    from worker.packing import _evaluate_together, _generate_together, _set_up

    specs = [spec(preset, "reverse", seed=0),
             spec(preset, "uppercase", seed=1, batch_size=3, max_new_tokens=5),
             spec(preset, "sort_digits", seed=2, eval_batch_size=5)]
    failed: dict[int, object] = {}
    pack = _set_up([context(s, tmp_path, f"job{i}") for i, s in enumerate(specs)], failed.__setitem__)
    assert not failed and pack is not None and len(pack.members) == 3
    # untrained adapters change nothing (B is zero): give each its own large update
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pack.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    members, router = pack.members, pack.router
    losses = _evaluate_together(members, router, pack.model, pack.objective, pack.device_manager)
    metrics = _generate_together(members, router, pack.model, pack.device_manager)
    samples = [member.trainer.samples for member in members]
    for member, loss, job_metrics, job_samples in zip(members, losses, metrics, samples, strict=True):
        assert not isinstance(job_metrics, BaseException), job_metrics
        with router.solo(member.adapter):
            assert member.trainer.evaluate() == pytest.approx(loss, abs=ATOL)
            assert member.trainer.task_metrics() == pytest.approx(job_metrics, abs=1e-9)
        assert member.trainer.samples == job_samples and len(job_samples) == 5
    assert all(len(sample["prediction"]) <= 5 for sample in samples[1])  # max_new_tokens 5 (a byte a token)
    # the test can tell the adapters apart: the first job's inputs through the second's adapter differ
    with router.solo(members[1].adapter):
        members[0].trainer.task_metrics()
    assert [s["prediction"] for s in members[0].trainer.samples] != [s["prediction"] for s in samples[0]]


def test_running_out_of_memory_in_a_packed_generation_fails_its_jobs_with_the_fix(tmp_path, one_torch_thread,
                                                                                  monkeypatch):
    from worker.errors import JobError
    from worker.packing import _generate_together, _set_up

    pack = _set_up([context(spec("gpt2-tiny", "reverse", seed=i), tmp_path, f"job{i}") for i in range(2)],
                   lambda index, error: pytest.fail(f"job{index} not set up: {error}"))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pack.model, "generate", out_of_memory)
    results = _generate_together(pack.members, pack.router, pack.model, pack.device_manager)
    assert all(isinstance(result, JobError) and "a pack of 2 jobs; run the worker with a smaller --pack" in str(result)
               for result in results), results
    assert pack.model.training  # left as training found it
