"""Sweeps and dependencies in a batch file: `matrix`, `include`/`exclude`, `sample`, `name`, `needs`, `from`.

Pure parsing: the batch documents are dicts (or YAML files) validated by `parse_batch`; only the
dry-run test goes through the CLI, and it checks that no database appears.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from jobs.batch import MAX_JOBS, Batch, load_batch, parse_batch
from jobs.cli import cli
from jobs.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]


def batch(tmp_path: Path, jobs: list[dict[str, Any]], **top: Any) -> Batch:
    """`parse_batch` of a document on the `dataset` fixture's file, as if read from tmp_path/b.yaml."""
    document = {"base_model": "random:t5-tiny", "defaults": {"train": {"dataset": "data/reverse.jsonl",
                                                                        "max_steps": 5}}, **top, "jobs": jobs}
    return parse_batch(copy.deepcopy(document), source=tmp_path / "b.yaml")


def problems(tmp_path: Path, jobs: list[dict[str, Any]], **top: Any) -> list[str]:
    with pytest.raises(SpecError) as caught:
        batch(tmp_path, jobs, **top)
    return caught.value.problems


LORA = {"task": "reverse", "extension": "lora"}


# --- matrix -----------------------------------------------------------------------------------------


def test_a_3x2x2_matrix_makes_12_jobs_in_written_order_with_their_params(tmp_path, dataset):
    made = batch(tmp_path, [{**LORA, "lora": {"r": 2, "alpha": 4}, "matrix": {
        "lora.r": [4, 8, 16], "train.learning_rate": [1e-3, 3e-3], "train.seed": [0, 1]}}])
    assert len(made.jobs) == 12
    assert made.params[0] == {"lora.r": 4, "train.learning_rate": 1e-3, "train.seed": 0}
    assert made.params[1] == {"lora.r": 4, "train.learning_rate": 1e-3, "train.seed": 1}  # last key fastest
    assert made.params[11] == {"lora.r": 16, "train.learning_rate": 3e-3, "train.seed": 1}
    for spec, params in zip(made.jobs, made.params, strict=True):
        # matrix values win over the job's own keys; the rest of the section stays
        assert (spec.lora.r, spec.train.learning_rate, spec.train.seed) == tuple(params.values())
        assert spec.lora.alpha == 4 and spec.train.max_steps == 5
    assert len({tuple(p.values()) for p in made.params}) == 12
    assert made.needs == [[]] * 12


def test_a_batch_matrix_multiplies_every_job_and_a_job_matrix_its_own(tmp_path, dataset):
    made = batch(tmp_path, [
        {**LORA, "matrix": {"lora.r": [4, 8]}},
        {"task": "block", "extension": "layer", "matrix": {"layer.init_scale": [0.0, 0.01, 0.1]}},
        {**LORA, "task": "plain", "matrix": {"train.seed": [7]}},  # the job's list wins for a key in both
    ], matrix={"train.seed": [0, 1]})
    assert [spec.task for spec in made.jobs] == ["reverse"] * 4 + ["block"] * 6 + ["plain"]
    assert made.params[:4] == [{"train.seed": s, "lora.r": r} for s in (0, 1) for r in (4, 8)]
    assert made.params[4] == {"train.seed": 0, "layer.init_scale": 0.0}
    assert made.params[10] == {"train.seed": 7} and made.jobs[10].train.seed == 7


def test_numbers_yaml_reads_as_strings_are_numbers_in_params(tmp_path, dataset):
    path = tmp_path / "b.yaml"
    path.write_text("base_model: random:t5-tiny\ndefaults: {train: {dataset: data/reverse.jsonl}}\n"
                    "jobs: [{task: t, extension: lora, matrix: {train.learning_rate: [1e-3, 3e-3], task: [a]}}]\n")
    made = load_batch(path)  # YAML 1.1 reads 1e-3 (no dot) as the string '1e-3'
    assert made.params == [{"train.learning_rate": 0.001, "task": "a"}, {"train.learning_rate": 0.003, "task": "a"}]


def test_job_keys_and_whole_sections_can_be_matrix_keys(tmp_path, dataset):
    made = batch(tmp_path, [{"task": "t", "kind": "create", "matrix": {
        "extension": ["lora", "hybrid"], "base_model": ["random:t5-tiny", "random:gpt2-tiny"],
        "lora": [{"r": 2}, {"r": 4, "alpha": 8}]}, "lora": {"alpha": 32, "dropout": 0.0}}])
    assert len(made.jobs) == 8
    last = made.jobs[-1]
    assert (last.extension, last.base_model, last.lora.r, last.lora.alpha, last.lora.dropout) == \
        ("hybrid", "random:gpt2-tiny", 4, 8, 0.0)  # a section value is merged into the job's section
    assert made.jobs[0].lora.alpha == 32


def test_include_extends_matching_combinations_and_adds_unmatched_ones(tmp_path, dataset):
    made = batch(tmp_path, [{**LORA, "matrix": {
        "lora.r": [4, 8], "train.seed": [0, 1],
        "include": [{"lora.r": 8, "lora.alpha": 32},            # extends both r=8 combinations
                    {"lora.r": 64, "train.learning_rate": 0.01}],  # matches none: a new job
    }}])
    assert made.params == [
        {"lora.r": 4, "train.seed": 0}, {"lora.r": 4, "train.seed": 1},
        {"lora.r": 8, "train.seed": 0, "lora.alpha": 32}, {"lora.r": 8, "train.seed": 1, "lora.alpha": 32},
        {"lora.r": 64, "train.learning_rate": 0.01},
    ]
    assert [spec.lora.alpha for spec in made.jobs] == [16, 16, 32, 32, 16]
    assert made.jobs[4].lora.r == 64 and made.jobs[4].train.learning_rate == 0.01


def test_exclude_removes_combinations_matching_every_key_of_an_entry(tmp_path, dataset):
    made = batch(tmp_path, [{**LORA, "matrix": {
        "lora.r": [4, 8], "train.seed": [0, 1, 2], "exclude": [{"lora.r": 8, "train.seed": 2}, {"train.seed": 0}]}}])
    assert made.params == [{"lora.r": 4, "train.seed": 1}, {"lora.r": 4, "train.seed": 2},
                           {"lora.r": 8, "train.seed": 1}]
    [problem] = problems(tmp_path, [{**LORA, "matrix": {"lora.r": [4], "exclude": [{"lora.r": 4}]}}])
    assert problem.startswith("job entry 0 (task 'reverse'): key `matrix.exclude`: excludes every combination")


def test_an_include_only_matrix_makes_one_job_per_entry(tmp_path, dataset):
    (tmp_path / "data" / "other.jsonl").write_text('{"input": "a", "target": "b"}\n')
    made = batch(tmp_path, [{**LORA, "matrix": {"include": [
        {"task": "rev"}, {"task": "other", "train.dataset": "data/other.jsonl"}]}}])
    assert [(spec.task, Path(spec.train.dataset).name) for spec in made.jobs] == \
        [("rev", "reverse.jsonl"), ("other", "other.jsonl")]
    assert made.params[1] == {"task": "other", "train.dataset": "data/other.jsonl"}  # as written


def test_a_dataset_mixture_resolves_and_checks_every_file(tmp_path, dataset):
    made = batch(tmp_path, [{**LORA, "train": {"dataset": ["data/reverse.jsonl", str(dataset)]}}])
    assert made.jobs[0].train.datasets == [str(dataset.resolve())] * 2
    [problem] = problems(tmp_path, [{**LORA, "train": {"dataset": ["data/reverse.jsonl", "data/gone.jsonl"]}}])
    assert problem.startswith("job 0 (task 'reverse'): key `train.dataset`") and "gone.jsonl" in problem


# --- sample -----------------------------------------------------------------------------------------

SAMPLE = {"trials": 5, "seed": 3, "train.learning_rate": {"loguniform": ["1e-4", 1e-2]},  # as YAML reads 1e-4
          "lora.r": {"choice": [4, 8, 16]}, "lora.dropout": {"uniform": [0.0, 0.3]}, "train.seed": {"int": [0, 9]}}


def test_sampling_is_deterministic_for_a_seed_and_differs_for_another(tmp_path, dataset):
    first = batch(tmp_path, [LORA], sample=SAMPLE)
    again = batch(tmp_path, [LORA], sample=SAMPLE)
    other = batch(tmp_path, [LORA], sample={**SAMPLE, "seed": 4})
    assert len(first.jobs) == 5 and first.params == again.params and first.params != other.params
    for spec, params in zip(first.jobs, first.params, strict=True):
        assert 1e-4 <= params["train.learning_rate"] <= 1e-2 and params["lora.r"] in (4, 8, 16)
        assert 0 <= params["lora.dropout"] <= 0.3 and params["train.seed"] in range(10)
        assert spec.train.learning_rate == params["train.learning_rate"] and spec.lora.r == params["lora.r"]


def test_a_sample_multiplies_a_matrix_each_cell_getting_the_same_trials(tmp_path, dataset):
    made = batch(tmp_path, [{**LORA, "matrix": {"task": ["a", "b"]},
                             "sample": {"trials": 3, "train.learning_rate": {"uniform": [1e-4, 1e-2]}}}])
    assert [spec.task for spec in made.jobs] == ["a"] * 3 + ["b"] * 3
    rates = [p["train.learning_rate"] for p in made.params]
    assert rates[:3] == rates[3:] and len(set(rates)) == 3


@pytest.mark.parametrize("distribution, expected", [
    ({"uniform": [1, 1]}, "lo must be less than hi"),
    ({"loguniform": [0, 1]}, "must be > 0"),
    ({"int": [0.5, 4]}, "must be integers"),
    ({"choice": []}, "non-empty list"),
    ({"normal": [0, 1]}, "must be one distribution"),
    ({"uniform": [1]}, "[lo, hi]"),
])
def test_bad_distributions_are_refused_naming_the_key(tmp_path, dataset, distribution, expected):
    [problem] = problems(tmp_path, [LORA], sample={"trials": 2, "train.learning_rate": distribution})
    assert problem.startswith("batch file: key `sample.train.learning_rate") and expected in problem


def test_a_sample_needs_trials(tmp_path, dataset):
    [problem] = problems(tmp_path, [{**LORA, "sample": {"lora.r": {"int": [2, 8]}}}])
    assert problem.startswith("job entry 0 (task 'reverse'): key `sample.trials`") and "required" in problem
    [problem] = problems(tmp_path, [LORA, LORA], sample={"lora.r": {"int": [2, 8]}})  # said once, not per job
    assert problem.startswith("batch file: key `sample.trials`")


# --- errors -----------------------------------------------------------------------------------------


def test_an_invalid_expanded_job_is_named_by_its_position_and_matrix_values(tmp_path, dataset):
    found = problems(tmp_path, [LORA, {**LORA, "matrix": {"lora.r": [8, 0], "train.learning_rate": [1e-3, 3e-3]}}])
    assert found == [
        "job 3 (lora.r=0, train.learning_rate=0.001): key `lora.r`: Input should be greater than 0 "
        "(and 1 more job of the same job entry)"
    ]


@pytest.mark.parametrize("matrix, expected", [
    ({"lora.rr": [4]}, "key `matrix.lora.rr`: not a job spec key; did you mean `lora.r`?"),
    ({"train.learnig_rate": [1e-3]}, "did you mean `train.learning_rate`?"),
    ({"name": ["a", "b"]}, "key `matrix.name`: `name` cannot vary"),
    ({"needs": [["a"]]}, "key `matrix.needs`: `needs` cannot vary"),
    ({"lora.r": 4}, "key `matrix.lora.r`: must be a non-empty list"),
    ({"lora.r": []}, "must be a non-empty list"),
    ({"lora.r": [4, 4]}, "listed twice"),
    ({"lora.r": [4], "exclude": [{"lora.alpha": 8}]}, "`lora.alpha` is not a key of the matrix"),
    ({"include": [{"lora.rank": 4}]}, "key `matrix.include.lora.rank`: not a job spec key"),
])
def test_a_malformed_matrix_is_refused_naming_the_key(tmp_path, dataset, matrix, expected):
    [problem] = problems(tmp_path, [{**LORA, "matrix": matrix}])
    assert problem.startswith("job entry 0 (task 'reverse'): ") and expected in problem


def test_aliases_are_matrix_keys_under_their_batch_file_spelling(tmp_path, dataset):
    made = batch(tmp_path, [{"task": "base", "name": "base", "kind": "create", "extension": "layer"},
                            {"task": "c", "extension": "hybrid", "matrix": {"layer.from_": ["base"]}}])
    assert made.params[1] == {"layer.from": "base"} and made.jobs[1].layer.from_ == "base"


def test_a_batch_beyond_the_limit_is_refused_with_the_count_before_expanding(tmp_path, dataset):
    huge = {"train.seed": list(range(1000)), "lora.r": list(range(1, 101)), "lora.alpha": [1, 2]}
    started = time.perf_counter()
    [problem] = problems(tmp_path, [LORA, {**LORA, "matrix": huge}])
    assert time.perf_counter() - started < 2  # validating 200,000 jobs would take far longer
    assert "200,001 jobs" in problem and f"{MAX_JOBS:,}" in problem and "job entry 1" in problem
    [problem] = problems(tmp_path, [LORA], sample={"trials": 10**9, "lora.r": {"int": [1, 8]}})
    assert "1,000,000,000 jobs" in problem


# --- names and needs --------------------------------------------------------------------------------

SHARED = {"task": "mix", "name": "shared", "extension": "layer"}


def test_needs_and_from_resolve_to_positions_and_ids(tmp_path, dataset):
    made = batch(tmp_path, [
        {**LORA, "name": "grid", "matrix": {"lora.r": [4, 8]}},
        {"task": "a", "extension": "hybrid", "needs": ["grid", "job:0123abcd"], "layer": {"from": "shared"}},
        SHARED,
        {"task": "b", "extension": "lora", "lora": {"from": "job:feedbeef"}},
    ])
    assert made.needs == [[], [], [0, 1, 3, "0123abcd"], [], ["feedbeef"]]
    assert made.order() == [0, 1, 3, 2, 4]
    assert made.jobs[0].name == made.jobs[1].name == "grid"


def test_order_puts_every_job_after_its_needs_and_keeps_batch_order_otherwise():
    unprioritised = SimpleNamespace(priority=None)  # order() reads only each job's priority
    made = Batch(name="b", source=None, base_model=None, jobs=[unprioritised] * 5,  # type: ignore[list-item]
                 needs=[[3], [], [4, "abc"], [], [1]])
    assert made.order() == [1, 3, 0, 4, 2]
    with pytest.raises(ValueError, match="cycle"):
        Batch(name="b", source=None, base_model=None, jobs=[unprioritised] * 2,  # type: ignore[list-item]
              needs=[[1], [0]]).order()


def test_a_cycle_is_refused_naming_it(tmp_path, dataset):
    found = problems(tmp_path, [
        {**LORA, "name": "a", "needs": ["b"]}, {**LORA, "name": "b", "needs": ["c"]},
        {**LORA, "name": "c", "needs": ["a"]}, {**LORA, "name": "d", "needs": ["a"]},
    ])
    assert len(found) == 1 and "a -> b -> c -> a" in found[0], found


@pytest.mark.parametrize("jobs, expected", [
    ([{**LORA, "needs": ["shraed"]}, SHARED], "job 0 (task 'reverse'): key `needs`: no job is named `shraed`; "
                                              "did you mean `shared`?"),
    ([{**SHARED, "needs": ["shared"]}], "key `needs`: `shared` is this job's own name"),
    ([{**LORA, "name": "x"}, {**LORA, "name": "x"}], "job 1 (task 'reverse'): key `name`: `x` is already the "
                                                     "name of job 0"),
    ([{**SHARED, "matrix": {"train.seed": [0, 1, 2]}}, {"task": "c", "extension": "hybrid",
                                                        "layer": {"from": "shared"}}],
     "`shared` names 3 jobs (a matrix); a `from` needs exactly one"),
    ([SHARED, {**LORA, "layer": {"from": "shared"}}], "key `layer.from`: a `lora` job has no added layer"),
    ([{**LORA, "name": "ad"}, {"task": "c", "extension": "hybrid", "layer": {"from": "ad"}}],
     "key `layer.from`: `ad` is a `lora` job: it trains no added layer"),
    ([SHARED, {**LORA, "lora": {"from": "shared"}}], "key `lora.from`: `shared` is a `layer` job: it trains no "
                                                     "LoRA adapter"),
    ([{**SHARED, "extension": "hybrid"}, {**LORA, "lora": {"from": "shared"}}],
     "key `lora.from`: `shared` is a `hybrid` job and this one a `lora` job"),
    ([{**SHARED, "extension": "hybrid"}, {"task": "c", "extension": "hybrid", "lora": {"from": "shared"}}],
     "key `lora.from`: the adapter of `shared` was trained on its added block too: add `layer.from: shared`"),
    ([{**SHARED, "base_model": "random:gpt2-tiny"}, {"task": "c", "extension": "hybrid",
                                                     "layer": {"from": "shared"}}],
     "`shared` is built on random:gpt2-tiny and this job on random:t5-tiny"),
    ([{"task": "c", "extension": "hybrid", "layer": {"freeze": True}}], "key `layer.freeze`: only a block "
                                                                        "loaded with `layer.from`"),
    ([SHARED, {"task": "c", "extension": "layer", "layer": {"from": "shared", "freeze": True}}],
     "nothing would train"),
], ids=["unknown", "itself", "duplicate-name", "from-a-matrix", "child-without-layer", "parent-without-layer",
        "parent-without-lora", "lora-kinds-differ", "hybrid-needs-layer-from", "base-model", "freeze-alone",
        "freeze-layer-job"])
def test_dependency_problems_are_refused(tmp_path, dataset, jobs, expected):
    found = problems(tmp_path, jobs)
    assert len(found) == 1 and expected in found[0], found


def test_create_parents_and_frozen_hybrid_children_are_fine(tmp_path, dataset):
    made = batch(tmp_path, [
        {**SHARED, "kind": "create", "extension": "hybrid"},
        {"task": "c", "extension": "hybrid", "layer": {"from": "shared", "freeze": True},
         "lora": {"from": "shared"}},
        {"task": "d", "extension": "layer", "layer": {"from": "shared"}, "matrix": {"train.seed": [0, 1]}},
    ])
    assert made.needs == [[], [0], [0], [0]] and made.jobs[1].layer.freeze


# --- dry run and the example ------------------------------------------------------------------------


def test_dry_run_prints_the_expanded_jobs_with_their_params_and_writes_nothing(tmp_path, dataset):
    path = tmp_path / "b.yaml"
    path.write_text("""
base_model: random:t5-tiny
defaults: {train: {dataset: data/reverse.jsonl}}
jobs:
  - {task: mix, name: shared, extension: layer}
  - {task: reverse, extension: hybrid, layer: {from: shared}, matrix: {lora.r: [4, 8], train.seed: [0, 1]}}
""")
    database = tmp_path / "x.db"
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{database}", "--broker-url",
                                      "redis://127.0.0.1:1/0", "submit", "--dry-run", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "5 jobs" in lines[0]
    assert lines[1].split() == ["#", "name", "task", "extension", "kind", "lora.r", "train.seed", "needs", "queue"]
    assert lines[2].split() == ["0", "shared", "mix", "layer", "train", "-", "-", "-", "graftq"]
    assert lines[6].split() == ["4", "-", "reverse", "hybrid", "train", "8", "1", "shared", "(0)", "graftq"]
    assert str(dataset.resolve()) in result.output
    assert not database.exists()


def test_the_sweep_example_loads_to_8_jobs():
    made = load_batch(ROOT / "examples" / "sweep.yaml")
    assert len(made.jobs) == 8 and {spec.extension for spec in made.jobs} == {"lora"}
    assert {tuple(p) for p in made.params} == {("lora.r", "train.learning_rate", "train.seed")}
    assert all(spec.base_model == "random:t5-tiny" and spec.train.max_steps <= 30 for spec in made.jobs)
