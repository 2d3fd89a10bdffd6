"""Where each model family keeps its blocks, and the names the extensions need.

Supporting a new family means adding one `Architecture` entry here; the extension logic
never names a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from worker.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    family: str
    #: "seq2seq", "causal" or "encoder": the objectives the family trains (jobs.metrics.OBJECTIVES_BY_TASK_TYPE)
    task_type: str
    #: stack name -> candidate dotted paths (from the loaded model's root) of its ModuleList of blocks
    stacks: dict[str, tuple[str, ...]]
    default_stack: str
    #: stack name -> config attribute holding that stack's block count
    layer_count_keys: dict[str, str]
    #: dotted names, relative to a block, of the attention-output and MLP-output projections
    output_projections: tuple[str, ...]
    default_lora_targets: tuple[str, ...]
    #: IA3's default targets and which of them are MLP layers (PEFT's own defaults for the family);
    #: empty: the LoRA targets, none of them feedforward
    default_ia3_targets: tuple[str, ...] = ()
    default_ia3_feedforward: tuple[str, ...] = ()
    #: the first block owns state (T5's relative attention bias) that a new block must not take
    first_block_owns_position_bias: bool = False
    #: config attribute holding the block count on a stack's *own* config (T5's stacks carry a copy
    #: of the model config in which num_layers is that stack's count; the KV cache is sized from it)
    stack_config_count_key: str | None = None
    #: the adaptable projections store their weight transposed (GPT-2's Conv1D): PEFT's `fan_in_fan_out`
    weights_fan_in_fan_out: bool = False
    #: activations overflow in float16 (T5 was trained in bf16): the dtype policy keeps such bases in
    #: fp32 where bf16 is not native
    overflows_in_fp16: bool = False
    model_types: tuple[str, ...] = field(default=())


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    for model_type in (arch.family, *arch.model_types):
        if model_type in ARCHITECTURES:
            raise ValueError(f"architecture {model_type!r} is registered twice")
        ARCHITECTURES[model_type] = arch
    return arch


register(Architecture(
    family="t5", task_type="seq2seq",
    stacks={"encoder": ("encoder.block",), "decoder": ("decoder.block",)},
    default_stack="encoder",
    layer_count_keys={"encoder": "num_layers", "decoder": "num_decoder_layers"},
    output_projections=("layer.0.SelfAttention.o", "layer.1.EncDecAttention.o",
                        "layer.1.DenseReluDense.wo", "layer.2.DenseReluDense.wo"),
    default_lora_targets=("q", "k", "v", "o"),
    default_ia3_targets=("k", "v", "wo"), default_ia3_feedforward=("wo",),
    first_block_owns_position_bias=True,
    stack_config_count_key="num_layers",
    overflows_in_fp16=True,
    model_types=("mt5", "umt5"),
))
register(Architecture(
    family="llama", task_type="causal",
    stacks={"decoder": ("model.layers",)},
    default_stack="decoder",
    layer_count_keys={"decoder": "num_hidden_layers"},
    output_projections=("self_attn.o_proj", "mlp.down_proj"),
    default_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    default_ia3_targets=("k_proj", "v_proj", "down_proj"), default_ia3_feedforward=("down_proj",),
    model_types=("mistral", "qwen2", "qwen3"),
))
register(Architecture(
    family="gpt2", task_type="causal",
    stacks={"decoder": ("transformer.h",)},
    default_stack="decoder",
    layer_count_keys={"decoder": "n_layer"},
    output_projections=("attn.c_proj", "mlp.c_proj"),
    default_lora_targets=("c_attn", "c_proj"),
    default_ia3_targets=("c_attn", "mlp.c_proj"), default_ia3_feedforward=("mlp.c_proj",),
    weights_fan_in_fan_out=True,
))
_BERT = register(Architecture(
    family="bert", task_type="encoder",
    stacks={"encoder": ("bert.encoder.layer", "encoder.layer")},
    default_stack="encoder",
    layer_count_keys={"encoder": "num_hidden_layers"},
    output_projections=("attention.output.dense", "output.dense"),
    default_lora_targets=("query", "key", "value"),
    default_ia3_targets=("key", "value", "output.dense"), default_ia3_feedforward=("output.dense",),
))
# RoBERTa is BERT's architecture under another attribute name.
register(replace(_BERT, family="roberta", stacks={"encoder": ("roberta.encoder.layer", "encoder.layer")}))


# Post-norm (a LayerNorm after each residual sum): a new block at init_scale 0 is not an identity here,
# since its norms still apply to the residual stream.
register(Architecture(
    family="bart", task_type="seq2seq",
    stacks={"encoder": ("model.encoder.layers",), "decoder": ("model.decoder.layers",)},
    default_stack="encoder",
    layer_count_keys={"encoder": "encoder_layers", "decoder": "decoder_layers"},
    output_projections=("self_attn.out_proj", "encoder_attn.out_proj", "fc2"),
    default_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    default_ia3_targets=("k_proj", "v_proj", "fc2"), default_ia3_feedforward=("fc2",),
))
register(Architecture(
    family="phi3", task_type="causal",
    stacks={"decoder": ("model.layers",)},
    default_stack="decoder",
    layer_count_keys={"decoder": "num_hidden_layers"},
    output_projections=("self_attn.o_proj", "mlp.down_proj"),
    # the attention's q, k and v are one fused projection
    default_lora_targets=("qkv_proj", "o_proj"),
    default_ia3_targets=("qkv_proj", "down_proj"), default_ia3_feedforward=("down_proj",),
))
# Gemma scales its embeddings by sqrt(hidden_size), before the blocks: an added block sees what its
# source block saw. It was trained in bfloat16, and its activations overflow in float16.
register(Architecture(
    family="gemma", task_type="causal",
    stacks={"decoder": ("model.layers",)},
    default_stack="decoder",
    layer_count_keys={"decoder": "num_hidden_layers"},
    output_projections=("self_attn.o_proj", "mlp.down_proj"),
    default_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    default_ia3_targets=("k_proj", "v_proj", "down_proj"), default_ia3_feedforward=("down_proj",),
    overflows_in_fp16=True,
))

def architecture_for(model_or_config) -> Architecture:
    """Return the Architecture of a model (or config); ConfigError names the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        families = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(
            f"base_model: architecture {model_type!r} is not supported; supported model types: {families}. "
            "Adding one is a single Architecture entry in worker/architectures.py."
        ) from None
