"""Base models: `random:<preset>`, a local directory, or a hub id from the local HF cache.

A worker process keeps the last loaded base model (frozen, on its device, in the base dtype)
and hands each job a *structural* copy that shares the frozen parameter tensors: building a
job's extension never touches the cached model, and set-up after the first job costs a copy of
the module tree, not a load.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from jobs.presets import PRESETS
from worker.architectures import ARCHITECTURES, Architecture, architecture_for
from worker.device import DeviceManager
from worker.errors import ConfigError, JobError
from worker.tokenizer import MARKER_FILE, ByteTokenizer, HFTokenizer

log = logging.getLogger(__name__)

_AUTO_CLASSES = {
    "seq2seq": transformers.AutoModelForSeq2SeqLM,
    "causal": transformers.AutoModelForCausalLM,
    "encoder": transformers.AutoModelForMaskedLM,
}
#: the modules that hold a sequence classifier's head (PEFT's SEQ_CLS `modules_to_save` too)
HEAD_MODULES = ("classifier", "score")


def auto_class(task_type: str, objective: str | None = None):
    """The transformers Auto class a base of `task_type` is loaded with for `objective`."""
    if objective == "classification":
        return transformers.AutoModelForSequenceClassification
    return _AUTO_CLASSES[task_type]


@dataclass
class BaseModel:
    """A loaded, frozen base model with what the pipeline needs to know about it."""

    name: str
    model: torch.nn.Module
    tokenizer: ByteTokenizer | HFTokenizer
    arch: Architecture


def build_random_preset(name: str, objective: str | None = None) -> tuple[torch.nn.Module, ByteTokenizer]:
    """Build `random:<name>` from its shipped config with the preset's fixed seed (CPU, fp32).

    With `objective` "classification" it is the family's sequence classifier (two labels; see
    `classifier_model` for a job's own head): the base weights come from the same seed.
    """
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ConfigError(f"base_model: unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None
    config_dict = dict(preset["config"])
    config = transformers.AutoConfig.for_model(**config_dict)
    config.name_or_path = f"random:{name}"
    arch = architecture_for(config)
    # Seed a private generator state so that the weights depend on the preset alone, not on
    # what the process drew from torch's RNG before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset["seed"])
        model = auto_class(arch.task_type, objective).from_config(config)
    model.name_or_path = f"random:{name}"
    return model, ByteTokenizer()


def base_family(name: str) -> str | None:
    """The architecture family of base model `name` (for the dtype policy); None if it cannot be read."""
    path = Path(name).expanduser()
    try:
        if name.startswith("random:"):
            config = transformers.AutoConfig.for_model(**PRESETS[name.removeprefix("random:")]["config"])
        else:
            config = transformers.AutoConfig.from_pretrained(str(path) if path.is_dir() else name,
                                                             local_files_only=True)
        return architecture_for(config).family
    except (KeyError, OSError, ValueError, JobError):  # loading the model reports it with advice
        return None


def base_task_type(name: str) -> str | None:
    """The task type ("seq2seq", "causal", "encoder") of base model `name`; None if it cannot be read."""
    family = base_family(name)
    return None if family is None else ARCHITECTURES[family].task_type


def load_base_model(name: str, device_manager: DeviceManager, objective: str | None = None,
                    quantize: str | None = None) -> BaseModel:
    """Load a base model, freeze it and place it per the dtype policy (quantised with bitsandbytes for
    `quantize`: `4bit` or `8bit`). Raises JobError/ConfigError.

    With `objective` "classification" the model is the family's sequence classifier.
    """
    if quantize is not None:
        model, tokenizer = _load_quantized(name, device_manager, quantize, objective)
    elif name.startswith("random:"):
        model, tokenizer = build_random_preset(name.removeprefix("random:"), objective)
        device_manager.place_base(model)
    else:
        model, tokenizer = _load_pretrained(name, device_manager, objective)
    model.requires_grad_(False)
    model.eval()
    return BaseModel(name=name, model=model, tokenizer=tokenizer, arch=architecture_for(model))


def _load_quantized(name: str, device_manager: DeviceManager, quantize: str, objective: str | None = None):
    """QLoRA's base: quantised weights on the GPU, prepared by PEFT for training adapters on it."""
    device = device_manager.device
    if device.type != "cuda":
        raise JobError(f"quantize: {quantize} needs a CUDA GPU (bitsandbytes), and this job runs on {device} "
                       f"(device: {device_manager.requested}); set device: cuda so that a GPU worker takes it, "
                       "or leave quantize out")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise JobError(f"quantize: {quantize} needs bitsandbytes, which this worker lacks: install it with "
                       "`pip install 'graftq[worker,qlora]'`, or leave quantize out") from error
    from peft import prepare_model_for_kbit_training

    if quantize == "4bit":
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=device_manager.base_dtype)
    else:
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    if name.startswith("random:"):
        # bitsandbytes quantises while loading: the preset goes through a model directory
        with tempfile.TemporaryDirectory(prefix="graftq-preset-") as directory:
            save_base_model(*build_random_preset(name.removeprefix("random:"), objective), directory)
            model, tokenizer = _load_pretrained(directory, device_manager, objective, quantization_config=config)
        model.name_or_path = name
    else:
        model, tokenizer = _load_pretrained(name, device_manager, objective, quantization_config=config)
    # gradient checkpointing stays the job's choice, not a side effect of quantising
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), tokenizer


def _load_pretrained(name: str, device_manager: DeviceManager, objective: str | None = None, **options):
    path = Path(name).expanduser()
    local = path.is_dir()
    if not local and name.startswith(("/", "./", "../", "~")):
        # written as a path, so not a hub id: say where it was looked for, not how to download it
        raise JobError(f"base_model: there is no model directory {name!r} ({path.absolute()}); a relative path "
                       "is read from the directory graftq (or the worker) runs in. Create the model there "
                       "first (the quickstart's: `python scripts/pretrain_demo_base.py`), or fix the path.")
    source = str(path) if local else name
    try:
        # local_files_only: a hub id comes from the local cache or fails at once; a worker never
        # hangs on a download or retries one.
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
        arch = architecture_for(config)
        # Loaded straight into the device and the base dtype: no fp32 copy in host memory, and
        # transformers keeps its fp32 buffers and `keep_in_fp32` modules.
        model = auto_class(arch.task_type, objective).from_pretrained(
            source, local_files_only=True, dtype=device_manager.base_dtype, device_map=str(device_manager.device),
            **options)
    except (OSError, ValueError) as error:
        if local:
            raise JobError(f"base_model: cannot load the model directory {source!r}: {error}") from error
        cache = os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface")
        raise JobError(
            f"base_model: {name!r} is neither a local directory nor in the local Hugging Face cache ({cache}). "
            f"Download it first where there is network access (`huggingface-cli download {name}`), "
            "point base_model at a saved model directory, or use a random:<preset>."
        ) from error
    if local and (path / MARKER_FILE).exists():
        tokenizer = ByteTokenizer()
    else:
        try:
            tokenizer = HFTokenizer(transformers.AutoTokenizer.from_pretrained(source, local_files_only=True))
        except (OSError, ValueError, TypeError):
            if config.vocab_size < ByteTokenizer.vocab_size:
                raise JobError(f"base_model: {name!r} has no tokenizer files and its vocabulary is too small "
                               "for graftq's byte tokenizer") from None
            log.warning("%s has no tokenizer files; using graftq's byte-level tokenizer", name)
            tokenizer = ByteTokenizer()
    return model, tokenizer


def save_base_model(model: torch.nn.Module, tokenizer, directory: str | Path) -> Path:
    """Save a model (e.g. a random preset) as a local model directory that base_model can name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def structural_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with `model`.

    Safe because base parameters are frozen: extensions replace or add modules in the copy and
    create new (trainable) parameters, and never write into the shared tensors.
    """
    memo = {id(tensor): tensor for tensor in model.parameters()}
    memo.update({id(tensor): tensor for tensor in model.buffers()})
    return copy.deepcopy(model, memo)


def classification_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The head of a sequence classifier (PEFT's wrapper around it on a PEFT model); None for any other model."""
    get_base = getattr(model, "get_base_model", None)
    root = get_base() if callable(get_base) else model
    if not type(root).__name__.endswith("ForSequenceClassification"):
        return None
    return next((getattr(root, name) for name in HEAD_MODULES if isinstance(getattr(root, name, None),
                                                                             torch.nn.Module)), None)


def classifier_model(base: BaseModel, labels: list[str], seed: int) -> torch.nn.Module:
    """A job's classifier: a structural copy of the classifier `base` (frozen, shared tensors) with a
    new fp32 head for `labels`, drawn from a generator seeded with `seed` (normal with the config's
    `initializer_range`, zero biases), and `id2label`/`label2id` in its config.
    Raises JobError for fewer than two labels.
    """
    if len(labels) < 2:
        raise JobError(f"train.dataset: a classifier needs at least two labels; the training data has "
                       f"{len(labels)} ({', '.join(map(repr, labels)) or 'none'})")
    model = structural_copy(base.model)
    root_head = classification_head(model)
    if root_head is None:
        raise ConfigError(f"base_model: {base.name!r} was not loaded as a sequence classifier")
    head = copy.deepcopy(root_head).to(torch.float32)  # fresh tensors: the cached head stays as it is
    linears = [(name, module) for name, module in head.named_modules() if isinstance(module, torch.nn.Linear)]
    last_name, last = linears[-1]
    out = torch.nn.Linear(last.in_features, len(labels), bias=last.bias is not None)
    head = out if not last_name else head
    if last_name:
        parent, _, attr = last_name.rpartition(".")
        setattr(head.get_submodule(parent) if parent else head, attr, out)
    generator = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.zero_()
    for name in HEAD_MODULES:
        if getattr(model, name, None) is root_head:
            setattr(model, name, head)
    config = model.config
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: index for index, label in enumerate(labels)}
    config.problem_type = "single_label_classification"
    if config.pad_token_id is None:  # decoder-only classifiers find each row's last token by it
        config.pad_token_id = base.tokenizer.pad_token_id
    head.to(next(base.model.parameters()).device)
    return model


class BaseModelCache:
    """Keeps the most recently used base model(s) of this process (one by default)."""

    def __init__(self, capacity: int = 1):
        self.capacity = capacity
        self._models: dict[tuple[str, str, str, bool, str | None], BaseModel] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, name: str, device_manager: DeviceManager, objective: str | None = None,
            quantize: str | None = None) -> tuple[BaseModel, bool]:
        """Return (base model, whether it came from the cache); a classifier for `objective` "classification"."""
        key = (name, str(device_manager.device), device_manager.dtype_name, objective == "classification", quantize)
        with self._lock:
            if key in self._models:
                self.hits += 1
                self._models[key] = self._models.pop(key)  # most recent last
                return self._models[key], True
            self.misses += 1
            while len(self._models) >= self.capacity:
                self._models.pop(next(iter(self._models)))
                device_manager.release()
            base = load_base_model(name, device_manager, objective, quantize)
            if self.capacity > 0:
                self._models[key] = base
            return base, False

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


BASE_MODELS = BaseModelCache(capacity=int(os.environ.get("GRAFTQ_MODEL_CACHE_SIZE", "1")))
