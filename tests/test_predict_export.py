"""`graftq predict` and `graftq export [--merge]` on jobs that `graftq run` recorded: predictions equal
the job's model called in Python, and a merged export loads and generates with plain transformers in
a process where graftq and peft cannot be imported, with the graftq model's outputs."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from jobs.cli import cli
from worker.models import build_random_preset
from worker.pipeline import load_job_model

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ["abc", "hello", "xy"]
PRESETS = {"t5-decoder": "t5-tiny", "t5-encoder": "t5-tiny", "gpt2": "gpt2-tiny", "llama": "llama-tiny",
           "bart-decoder": "bart-tiny", "phi3": "phi3-tiny", "gemma": "gemma-tiny", "t5-two-blocks": "t5-tiny"}
#: task -> {config key: block count} of its merged export
MERGED_COUNTS = {
    "t5-decoder": {"num_layers": 2, "num_decoder_layers": 3, "decoder_layers": 3},
    "t5-encoder": {"num_layers": 3, "num_decoder_layers": 2},
    "gpt2": {"n_layer": 3}, "llama": {"num_hidden_layers": 3},
    "bart-decoder": {"encoder_layers": 2, "decoder_layers": 4}, "phi3": {"num_hidden_layers": 4},
    "gemma": {"num_hidden_layers": 4}, "t5-two-blocks": {"num_layers": 2, "num_decoder_layers": 4, "decoder_layers": 4},
}

#: task -> the job: a train job (LoRA B nonzero, so merging matters) or a create job whose added
#: block's init_scale is large enough to change the outputs
BATCH = """\
batch: predict-export
defaults:
  lora: {r: 4, alpha: 8, dropout: 0.0}
  layer: {init_scale: 0.5}
  train: {dataset: data.jsonl, max_steps: 3, batch_size: 4, learning_rate: 0.05, eval_fraction: 0, max_length: 16}
jobs:
  - {task: t5-decoder, extension: hybrid, base_model: "random:t5-tiny", layer: {stack: decoder}}
  - {task: t5-encoder, kind: create, extension: layer, base_model: "random:t5-tiny", layer: {stack: encoder}}
  - {task: gpt2, extension: hybrid, base_model: "random:gpt2-tiny"}
  - {task: llama, kind: create, extension: hybrid, base_model: "random:llama-tiny", layer: {position: 1}}
  - {task: lora-only, extension: lora, base_model: "random:t5-tiny"}
  - {task: bart-decoder, extension: hybrid, base_model: "random:bart-tiny", layer: {stack: decoder, positions: [1, 2]}}
  - {task: phi3, kind: create, extension: layer, base_model: "random:phi3-tiny", layer: {positions: [0, 2]}}
  - {task: gemma, kind: create, extension: hybrid, base_model: "random:gemma-tiny", layer: {expand: {every: 1}}}
  - {task: t5-two-blocks, kind: create, extension: layer, base_model: "random:t5-tiny",
     layer: {stack: decoder, positions: [1, 2]}}
  - {task: chat, extension: lora, base_model: "random:gpt2-tiny", train: {dataset: chat.jsonl, format: chat, max_length: 64}}
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict:
    """The batch above, run with `graftq run`: {"options": global CLI options, "jobs": task -> job}."""
    root = tmp_path_factory.mktemp("predict-export")
    rows = [{"input": word, "target": word[::-1]} for word in ("abc", "hello", "xy", "graft", "queue", "tiny")]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    chats = [[{"role": "user", "content": word}, {"role": "assistant", "content": word[::-1]}]
             for word in ("abc", "hello", "xy", "graft")]
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    (root / "batch.yaml").write_text(BATCH)
    options = ["--database-url", f"sqlite:///{root / 'graftq.db'}", "--artifacts-dir", str(root / "artifacts")]
    result = CliRunner().invoke(cli, [*options, "run", str(root / "batch.yaml")])
    assert result.exit_code == 0, result.output
    jobs = json.loads(CliRunner().invoke(cli, [*options, "results", "--format", "json"]).output)
    for job in jobs:
        job["job_dir"] = str(Path(job["adapter_path"] or job["layer_path"]).parent)
    return {"root": root, "options": options, "jobs": {job["task"]: job for job in jobs}}


def graftq(pool: dict, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [*pool["options"], *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def reference_predictions(job_dir: str, texts: list[str], max_new_tokens: int, chat: bool = False) -> list[str]:
    """Each input alone through the job's model: tokens + eos in (a chat job: the rendered user turn and
    generation prompt), greedy `generate`, decoded to eos."""
    model, tokenizer, _ = load_job_model(job_dir)
    predictions = []
    for text in texts:
        if chat:
            ids = torch.tensor([tokenizer.encode(f"<|user|>\n{text}\n<|assistant|>\n")])
        else:
            ids = torch.tensor([tokenizer.encode(text) + [tokenizer.eos_token_id]])
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)[0].tolist()
        if not model.config.is_encoder_decoder:
            output = output[ids.shape[1]:]
        output = output[:output.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in output else output
        predictions.append(tokenizer.decode(output))
    return predictions


# ---- predict ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["t5-decoder", "gpt2", "chat"])
def test_predict_equals_the_job_model_called_in_python(pool, task):
    job = pool["jobs"][task]
    code, out, err = graftq(pool, "predict", job["id"], *[arg for text in INPUTS for arg in ("--input", text)],
                            "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["input"] for line in lines] == INPUTS
    assert [line["prediction"] for line in lines] == reference_predictions(job["job_dir"], INPUTS, 6, task == "chat")
    assert any(line["prediction"] for line in lines)  # the models say something, so equality means something
    assert f"artifacts in {job['job_dir']}" in err


def test_predict_reads_jsonl_and_csv_files_and_writes_out(pool, tmp_path):
    job = pool["jobs"]["t5-decoder"]
    (tmp_path / "in.jsonl").write_text('{"input": "abc", "target": "cba"}\n{"input": "xy", "target": "yx"}\n')
    with (tmp_path / "in.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["text", "target"], ["abc", "cba"], ["xy", "yx"]])
    code, out, err = graftq(pool, "predict", job["id"], "--file", str(tmp_path / "in.jsonl"),
                            "--out", str(tmp_path / "a.jsonl"), "--max-new-tokens", "6")
    assert code == 0 and out == "" and "2 predictions written" in err
    code, _, err = graftq(pool, "predict", job["id"][:8], "--file", str(tmp_path / "in.csv"), "--column", "text",
                          "--out", str(tmp_path / "b.jsonl"), "--max-new-tokens", "6", "--batch-size", "1")
    assert code == 0, err
    assert "predicted 1/2" in err  # progress, batch by batch, on stderr
    from_jsonl, from_csv = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
                            for name in ("a.jsonl", "b.jsonl"))
    assert from_jsonl == from_csv
    assert [(row["input"], row["target"]) for row in from_jsonl] == [("abc", "cba"), ("xy", "yx")]
    assert [row["prediction"] for row in from_jsonl] == reference_predictions(job["job_dir"], ["abc", "xy"], 6)

    code, _, err = graftq(pool, "predict", job["id"], "--file", str(tmp_path / "in.csv"))
    assert code == 1 and "no 'input' column" in err and "--column" in err


def test_predict_refuses_unknown_and_unfinished_jobs(pool, tmp_path):
    code, _, err = graftq(pool, "predict", "nosuchjob", "--input", "abc")
    assert code == 2 and "no job with id 'nosuchjob'" in err
    job = pool["jobs"]["lora-only"]
    code, _, err = graftq(pool, "predict", job["id"], "--input", "abc", "--file", "x.jsonl")
    assert code == 2 and "not both" in err

    database = sqlite3.connect(pool["options"][1].removeprefix("sqlite:///"))
    with database:
        database.execute("UPDATE jobs SET status = 'failed' WHERE id = ?", (job["id"],))
    try:
        code, _, err = graftq(pool, "predict", job["id"], "--input", "abc")
        assert code == 1 and f"job {job['id']} is failed" in err
        code, _, err = graftq(pool, "export", job["id"], str(tmp_path / "out"))
        assert code == 1 and "is failed" in err and not (tmp_path / "out").exists()
    finally:
        with database:
            database.execute("UPDATE jobs SET status = 'succeeded' WHERE id = ?", (job["id"],))


def test_predict_finds_a_moved_job_under_the_artifacts_dir(pool, tmp_path):
    """The database records a pool host's path; here the job lives under --artifacts-dir."""
    job = pool["jobs"]["llama"]
    moved = tmp_path / "artifacts"
    shutil.copytree(job["job_dir"], moved / job["batch_id"] / job["id"])
    options = [pool["options"][0], pool["options"][1], "--artifacts-dir", str(moved)]
    database = sqlite3.connect(pool["options"][1].removeprefix("sqlite:///"))
    with database:
        database.execute("UPDATE jobs SET job_dir = '/nowhere/on/this/host' WHERE id = ?", (job["id"],))
    try:
        result = CliRunner().invoke(cli, [*options, "predict", job["id"], "--input", "abc", "--max-new-tokens", "3"])
        assert result.exit_code == 0, result.output
        assert f"artifacts in {moved / job['batch_id'] / job['id']}" in result.stderr
        assert json.loads(result.stdout)["input"] == "abc"
        (moved / job["batch_id"] / job["id"] / "layer" / "layer.safetensors").unlink()
        result = CliRunner().invoke(cli, [*options, "predict", job["id"], "--input", "abc"])
        assert result.exit_code == 1 and "are its artifacts complete?" in result.stderr, result.output
        shutil.rmtree(moved)
        result = CliRunner().invoke(cli, [*options, "predict", job["id"], "--input", "abc"])
        assert result.exit_code == 1 and "not on this host" in result.stderr and "--artifacts-dir" in result.stderr
    finally:
        with database:
            database.execute("UPDATE jobs SET job_dir = ? WHERE id = ?", (job["job_dir"], job["id"]))


# ---- export -------------------------------------------------------------------------------------

def test_export_without_merge_copies_the_adapter_and_the_block_with_a_readme(pool, tmp_path):
    job = pool["jobs"]["t5-decoder"]
    code, out, err = graftq(pool, "export", job["id"], str(tmp_path / "out"))
    assert code == 0, err
    for name in ("adapter/adapter_config.json", "layer/layer.safetensors", "layer/extension.json", "job.json"):
        assert (tmp_path / "out" / name).read_bytes() == (Path(job["job_dir"]) / name).read_bytes(), name
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "random:t5-tiny" in readme and "load_job_model" in readme and "--merge" in readme
    model, _, _ = load_job_model(tmp_path / "out")  # the exported directory is a job directory
    assert model is not None

    code, _, err = graftq(pool, "export", job["id"], str(tmp_path / "out"))
    assert code == 1 and "not empty" in err

    lora = pool["jobs"]["lora-only"]
    code, _, err = graftq(pool, "export", lora["id"], str(tmp_path / "lora"))
    assert code == 0 and "PeftModel.from_pretrained" in (tmp_path / "lora" / "README.md").read_text()
    assert not (tmp_path / "lora" / "layer").exists()


#: run in `python -I -S` with only site-packages on sys.path: graftq (an editable install, found
#: through a .pth file that -S skips) cannot be imported; loading must not import peft either
PLAIN_LOAD = r"""
import importlib.util, json, sys
sys.path.append(SITE)
import torch, transformers
assert importlib.util.find_spec("worker") is None and importlib.util.find_spec("jobs") is None
found = {}
for name, (directory, auto, ids) in CASES.items():
    model = getattr(transformers, auto).from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = torch.tensor(ids)
    mask = (ids != 0).long()
    with torch.no_grad():
        extra = {"decoder_input_ids": ids[:, :3]} if model.config.is_encoder_decoder else {}
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   suppress_tokens=[0, 1])
    found[name] = {"logits": logits.tolist(), "generated": generated.tolist(),
                   "encoded": tokenizer("abc")["input_ids"]}
assert "peft" not in sys.modules and "worker" not in sys.modules and "jobs" not in sys.modules
print(json.dumps(found))
"""


def test_merged_export_loads_and_generates_with_plain_transformers(pool, tmp_path):
    ids = [[100, 101, 102, 1], [120, 121, 1, 0]]  # "abc" + eos, "uv" + eos + padding
    cases, expected = {}, {}
    for task in MERGED_COUNTS:
        job = pool["jobs"][task]
        code, out, err = graftq(pool, "export", job["id"], str(tmp_path / task), "--merge")
        assert code == 0, err
        auto = out.split("transformers.", 1)[1].split(".from_pretrained", 1)[0]
        assert auto == ("AutoModelForSeq2SeqLM" if task.startswith(("t5", "bart")) else "AutoModelForCausalLM")
        cases[task] = (str(tmp_path / task), auto, ids)

        model, _, _ = load_job_model(job["job_dir"])
        inputs = torch.tensor(ids)
        with torch.no_grad():
            extra = {"decoder_input_ids": inputs[:, :3]} if model.config.is_encoder_decoder else {}
            logits = model(input_ids=inputs, attention_mask=(inputs != 0).long(), **extra).logits
            generated = model.generate(input_ids=inputs, attention_mask=(inputs != 0).long(), max_new_tokens=6,
                                       do_sample=False, suppress_tokens=[0, 1])
        expected[task] = (logits, generated.tolist())
        config = json.loads((tmp_path / task / "config.json").read_text())
        assert {key: config.get(key) for key in MERGED_COUNTS[task]} == MERGED_COUNTS[task], task
        if "layer_types" in config:
            assert len(config["layer_types"]) == config["num_hidden_layers"], task
        assert list((tmp_path / task).glob("*.safetensors")) and not list((tmp_path / task).glob("*.bin"))

    code = PLAIN_LOAD.replace("SITE", repr(sysconfig.get_paths()["purelib"])).replace("CASES", repr(cases))
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for task, (logits, generated) in expected.items():
        assert torch.allclose(torch.tensor(found[task]["logits"]), logits, atol=1e-4, rtol=0), task
        assert found[task]["generated"] == generated, task
        assert found[task]["encoded"] == [100, 101, 102, 1], task  # graftq's byte ids, eos appended
        # the merged extension matters: the base model alone computes other logits
        base, _ = build_random_preset(PRESETS[task])
        extra = {"decoder_input_ids": torch.tensor(ids)[:, :3]} if base.config.is_encoder_decoder else {}
        with torch.no_grad():
            plain = base(input_ids=torch.tensor(ids), attention_mask=(torch.tensor(ids) != 0).long(), **extra).logits
        assert not torch.allclose(plain, logits, atol=1e-3), task


def test_a_classifier_predicts_its_labels_with_scores():
    """A sequence classifier (what a classification job's model is): the label of the argmax, in
    batches as for each input alone."""
    import transformers

    from jobs.presets import PRESETS as CONFIGS
    from worker.predict import GenerationSettings, Predictor
    from worker.tokenizer import ByteTokenizer

    config = transformers.AutoConfig.for_model(**CONFIGS["gpt2-tiny"]["config"], num_labels=3,
                                             initializer_range=0.5)
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(config).eval()
    info = {"labels": ["negative", "neutral", "positive"]}
    predictor = Predictor(model=model, tokenizer=ByteTokenizer(), info=info, device=torch.device("cpu"),
                          max_length=16, task_type="classification", labels=info["labels"])
    texts = ["good", "not good at all", "ok", "bad", "fine", "meh"]
    rows = list(predictor.predict([{"input": text} for text in texts], GenerationSettings(), batch_size=4,
                                  scores=True))
    alone = []
    for text in texts:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([predictor.encode(text)])).logits[0]
        alone.append(info["labels"][int(logits.argmax())])
    assert [row["prediction"] for row in rows] == alone and len(set(alone)) > 1
    assert all(set(row["scores"]) == set(info["labels"]) and abs(sum(row["scores"].values()) - 1) < 1e-5
               for row in rows)
    assert all(row["scores"][row["prediction"]] == max(row["scores"].values()) for row in rows)


def test_a_layer_model_saved_with_save_pretrained_generates_when_reloaded(pool, tmp_path):
    """The graftq model itself (not an export) of a job with an added decoder block: saved with
    `save_pretrained`, plain transformers reloads it, and its generation cache has a layer for
    every decoder block."""
    import transformers

    model, _, _ = load_job_model(pool["jobs"]["t5-decoder"]["job_dir"])
    model = model.merge_and_unload()
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[100, 101, 102, 1]])
    expected = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, suppress_tokens=[0, 1])
    assert reloaded.generate(input_ids=ids, max_new_tokens=5, do_sample=False, suppress_tokens=[0, 1]).tolist() \
        == expected.tolist()
