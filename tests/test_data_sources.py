"""Data sources: Parquet, save_to_disk directories and `hf:` datasets from the local cache, column
mapping, split, weighted mixtures and the chat format (loss on assistant turns only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.batch import load_batch
from jobs.errors import SpecError
from jobs.spec import JobSpec
from worker.data import IGNORE_INDEX, chat_segments, read_rows, read_training_rows, tokenize_chat
from worker.errors import JobError
from worker.pipeline import JobContext, run_job
from worker.tokenizer import ByteTokenizer, HFTokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["abc", "xyz", "cat", "dog", "sun", "map", "red", "fox", "owl", "bee", "ink", "jar"]
CHATS = [[{"role": "system", "content": "Reverse words."}, {"role": "user", "content": w},
          {"role": "assistant", "content": w[::-1]}, {"role": "user", "content": "again"},
          {"role": "assistant", "content": w[::-1] + "!"}] for w in WORDS]


def sentences(words=WORDS) -> dict[str, list[str]]:
    return {"sentence": list(words), "label": [w[::-1] for w in words]}


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache of this test's own (HF_HOME), offline."""
    home = tmp_path / "hf-home"
    for name in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def cache_prepared(home: Path, repo: str, config: str, splits: dict[str, dict[str, list]], tmp_path: Path) -> None:
    """What an online `load_dataset(repo, config)` leaves in HF_HOME/datasets: the prepared Arrow copy."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, columns in splits.items():
        files[split] = str(tmp_path / f"raw-{split}.parquet")
        pq.write_table(pa.table(columns), files[split])
    namespace, name = repo.split("/")
    cache = home / "datasets"
    Parquet(cache_dir=str(cache), dataset_name=name, config_name=config, config_id=config, data_files=files,
            hash="0123456789abcdef").download_and_prepare()
    shutil.move(cache / name, cache / f"{namespace}___{name}")


def cache_snapshot(home: Path, repo: str, columns: dict[str, list]) -> Path:
    """What `hf download --repo-type dataset repo` leaves in HF_HOME/hub: a snapshot and refs/main."""
    root = home / "hub" / f"datasets--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / "3f2e1d0c"
    (snapshot / "data").mkdir(parents=True)
    pq.write_table(pa.table(columns), snapshot / "data" / "train-00000-of-00001.parquet")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("3f2e1d0c")
    return snapshot


def write_batch(tmp_path: Path, train: dict, base_model="random:t5-tiny", **job) -> Path:
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump({"jobs": [{"task": "rev", "extension": "lora", "base_model": base_model,
                                              "device": "cpu", "lora": {"r": 2, "dropout": 0.0},
                                              "train": {"max_steps": 2, "batch_size": 4, **train}, **job}]}))
    return path


def problems(path: Path) -> str:
    with pytest.raises(SpecError) as error:
        load_batch(path)
    return str(error.value)


def train(spec: JobSpec, tmp_path: Path):
    return run_job(JobContext(job_id="j1", batch_id="b1", spec=spec, artifacts_root=tmp_path / "artifacts"))


# -- local sources ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_parquet_and_save_to_disk_sources_train_with_mapped_columns(tmp_path):
    import datasets

    pq.write_table(pa.table(sentences()), tmp_path / "train.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(sentences(WORDS[:4])),
                          "validation": datasets.Dataset.from_dict(sentences())}).save_to_disk(tmp_path / "saved")
    batch = load_batch(write_batch(tmp_path, {
        "dataset": ["train.parquet", {"path": "saved", "split": "validation"}],
        "columns": {"input": "sentence", "target": "label"}}))
    spec = batch.jobs[0]
    assert spec.train.datasets == [str(tmp_path / "train.parquet"), str(tmp_path / "saved")]
    train_rows, eval_rows = read_training_rows(spec.train)
    assert len(train_rows) + len(eval_rows) == 2 * len(WORDS)  # the validation split, not train's 4 rows
    assert {"input": "cat", "target": "tac"} in train_rows + eval_rows
    outcome = train(spec, tmp_path)
    assert outcome.metrics["steps"] == 2


def test_validation_reads_columns_and_splits_without_datasets_or_torch(tmp_path, hf_home):
    import datasets

    pq.write_table(pa.table(sentences()), tmp_path / "train.parquet")
    datasets.Dataset.from_dict(sentences()).save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(sentences())}).save_to_disk(tmp_path / "dict")
    cache_prepared(hf_home, "me/tiny", "default", {"train": sentences()}, tmp_path)
    good = write_batch(tmp_path, {"dataset": ["train.parquet", "saved", "dict", "hf:me/tiny"],
                                  "columns": {"input": "sentence", "target": "label"}})
    probe = ("import sys; from jobs.batch import load_batch; batch = load_batch(sys.argv[1]); "
             "print(len(batch.jobs), sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", probe, str(good)], capture_output=True, text=True, env=env,
                            check=True)
    assert result.stdout.split("\n")[0] == "1 []"

    # the mapped column missing, in each kind of source; the job and the key are named
    for source in ("train.parquet", "saved", "dict", "hf:me/tiny"):
        message = problems(write_batch(tmp_path, {"dataset": source, "columns": {"input": "text",
                                                                                 "target": "label"}}))
        assert message.count("job 0 (task 'rev'): key `train.dataset`") == 1, message
        assert "no column `text` (for input)" in message and "sentence" in message
    for source in ("dict", "hf:me/tiny"):
        message = problems(write_batch(tmp_path, {"dataset": source, "split": "test",
                                                  "columns": {"input": "sentence", "target": "label"}}))
        assert "no split 'test'" in message and "train.split" in message
    message = problems(write_batch(tmp_path, {"dataset": "hf:me/absent"}))
    assert "key `train.dataset`: hub dataset 'hf:me/absent' is not in the local Hugging Face cache" in message
    assert "load_dataset('me/absent')" in message and "save_to_disk" in message
    message = problems(write_batch(tmp_path, {"dataset": "hf:me/tiny:", "columns": {"question": "x"}}))
    assert "key `train.dataset`" in message and "hf:NAME:CONFIG" in message
    assert "key `train.columns`" in message and "unknown column 'question'" in message
    (tmp_path / "plain").mkdir()
    assert "is not a dataset directory" in problems(write_batch(tmp_path, {"dataset": "plain"}))


# -- hub datasets from the local cache --------------------------------------------------------------

def test_hub_dataset_loads_from_the_prepared_cache_and_from_a_hub_snapshot(tmp_path, hf_home):
    cache_prepared(hf_home, "me/tiny", "rev", {"train": sentences(), "test": sentences(WORDS[:3])}, tmp_path)
    columns = {"input": "sentence", "target": "label"}
    rows = read_rows("hf:me/tiny:rev", columns, "test")
    assert rows == [{"input": w, "target": w[::-1]} for w in WORDS[:3]]
    assert len(read_rows("hf:me/tiny", columns)) == len(WORDS)  # the only config; split train

    cache_snapshot(hf_home, "me/chats", {"messages": CHATS})
    rows = read_rows("hf:me/chats", needed=("messages",))
    assert rows[0]["messages"] == CHATS[0] and len(rows) == len(WORDS)

    with pytest.raises(JobError, match=r"train\.dataset: hub dataset 'hf:me/absent' is not in the local "
                                       r"Hugging Face cache .*load_dataset\('me/absent'\)"):
        read_rows("hf:me/absent")
    with pytest.raises(JobError, match=r"cannot load 'hf:me/tiny:rev' split 'validation'.*train\.split"):
        read_rows("hf:me/tiny:rev", columns, "validation")
    with pytest.raises(JobError, match=r"hf:me/tiny:rev row 1 lacks the `text` and `label` columns"):
        read_rows("hf:me/tiny:rev", {"input": "text", "target": "label"})


# -- mixtures ---------------------------------------------------------------------------------------

def test_weighted_mixture_repeats_and_samples_training_rows_after_the_split(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    a.write_text("".join(json.dumps({"input": f"a{i}", "target": "x"}) + "\n" for i in range(20)))
    b.write_text("input,target\n" + "".join(f"b{i},y\n" for i in range(10)))

    def rows(dataset, **extra):
        spec = JobSpec(task="t", extension="lora", base_model="random:t5-tiny",
                       train={"dataset": dataset, "eval_fraction": 0.1, "seed": 3, **extra})
        return read_training_rows(spec.train)

    plain_train, plain_eval = rows([str(a), str(b)])
    assert len(plain_train) == 27 and len(plain_eval) == 3
    weighted_train, weighted_eval = rows([{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 2}])
    assert weighted_eval == plain_eval  # held out before weighting
    held_out = {row["input"] for row in plain_eval}
    assert not held_out & {row["input"] for row in weighted_train}  # a repeated row never lands on both sides
    a_train = [row for row in plain_train if row["input"].startswith("a")]
    b_train = [row for row in plain_train if row["input"].startswith("b")]
    counts = {}
    for row in weighted_train:
        counts[row["input"]] = counts.get(row["input"], 0) + 1
    assert all(counts[row["input"]] == 2 for row in b_train)  # weight 2: each training row twice
    sampled = [row["input"] for row in a_train if row["input"] in counts]
    assert len(sampled) == round(0.5 * len(a_train)) and all(counts[name] == 1 for name in sampled)
    assert rows([{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 2}])[0] == weighted_train  # seeded
    other_seed = rows([{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 2}], eval_fraction=0.0)[0]
    assert len(other_seed) == round(0.5 * 20) + 2 * 10
    # weight 1.5 = every row once, and a seeded half of them once more; per-source columns
    c = tmp_path / "c.jsonl"
    c.write_text("".join(json.dumps({"q": f"c{i}", "a": "z"}) + "\n" for i in range(4)))
    mixed = rows([str(a), {"path": str(c), "weight": 1.5, "columns": {"input": "q", "target": "a"}}],
                 eval_fraction=0.0)[0]
    c_rows = sorted(row["input"] for row in mixed if row["input"].startswith("c"))
    assert set(c_rows) == {"c0", "c1", "c2", "c3"} and len(c_rows) == 6


def test_weight_must_be_positive_and_named_in_the_problem(tmp_path, dataset):
    message = problems(write_batch(tmp_path, {"dataset": [str(dataset), {"path": str(dataset), "weight": 0}]}))
    assert message.endswith("job 0 (task 'rev'): key `train.dataset`: item 1: `weight`: Input should be "
                            "greater than 0")
    message = problems(write_batch(tmp_path, {"dataset": [{"path": str(dataset), "wieght": 2}]}))
    assert message.endswith("key `train.dataset`: item 0: unknown key `wieght` (a source mapping has path, "
                            "weight, columns, split)")


# -- chat -------------------------------------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_chat_tokenizer(template: str | None = CHATML) -> HFTokenizer:
    """A byte-level BPE tokenizer with ChatML specials, trained here (offline) on the test's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator([json.dumps(CHATS)] * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>")
    tokenizer.chat_template = template
    return HFTokenizer(tokenizer)


@pytest.mark.parametrize("make", [ByteTokenizer, hf_chat_tokenizer], ids=["byte", "hf-chatml"])
def test_chat_labels_cover_exactly_the_assistant_turns(make):
    tokenizer = make()
    messages = CHATS[2]
    (example,) = tokenize_chat([{"messages": messages}], tokenizer, "causal", max_length=512)
    rendered = tokenizer.render_chat(messages)
    assert tokenizer.decode(example.input_ids, skip_special_tokens=False) == rendered
    # the labelled tokens, run by run, are the assistant replies with the template's end of turn
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    runs.append(current)
    end = "<|im_end|>\n" if isinstance(tokenizer, HFTokenizer) else "\n"
    assert [tokenizer.decode(run, skip_special_tokens=False) for run in runs] == ["tac" + end, "tac!" + end]
    assert "".join(text for text, _ in chat_segments(messages, tokenizer)) == rendered
    # cut at max_length: a conversation with no assistant token left is dropped
    short = tokenize_chat([{"messages": messages}] * 2 + [{"messages": CHATS[0]}], tokenizer, "causal", 200)
    assert all(len(e.input_ids) <= 200 for e in short)


def test_chat_is_refused_without_a_template_or_on_a_seq2seq_model(tmp_path):
    rows = [{"messages": CHATS[0]}]
    with pytest.raises(JobError, match=r"train\.format: chat needs a chat template.*format: text"):
        tokenize_chat(rows, hf_chat_tokenizer(template=None), "causal", 64)
    with pytest.raises(JobError, match=r"train\.format: chat needs a decoder-only"):
        tokenize_chat(rows, ByteTokenizer(), "seq2seq", 64)
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    message = problems(write_batch(tmp_path, {"dataset": "chat.jsonl", "format": "chat"}))
    assert "job 0 (task 'rev'): key `train.format`: chat needs a decoder-only (causal) model; random:t5-tiny" \
        in message
    # a chat file without `messages`, and a text job given a chat file
    (tmp_path / "pairs.jsonl").write_text('{"input": "a", "target": "b"}\n')
    assert "no column `messages`" in problems(write_batch(tmp_path, {"dataset": "pairs.jsonl", "format": "chat"},
                                                          base_model="random:gpt2-tiny"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" * 2 +
                   json.dumps({"messages": CHATS[0]}) + "\n")
    with pytest.raises(JobError, match=r"bad\.jsonl line 1: `messages` has no assistant turn"):
        read_rows(bad, needed=("messages",))


@pytest.mark.slow
def test_a_chat_job_trains_on_a_causal_preset(tmp_path):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"conversation": m}) + "\n" for m in CHATS))
    batch = load_batch(write_batch(tmp_path, {"dataset": "chat.jsonl", "format": "chat",
                                              "columns": {"messages": "conversation"}, "max_length": 96},
                                   base_model="random:llama-tiny"))
    outcome = train(batch.jobs[0], tmp_path)
    assert outcome.metrics["steps"] == 2 and outcome.metrics["eval_loss"] is not None
