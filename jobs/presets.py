"""Architectures shipped with graftq for `random:<preset>` base models (torch-free).

Each preset is a Hugging Face config (as a plain dict), its family's task type (which says
at validation which objectives it can train: see `jobs.metrics.OBJECTIVES_BY_TASK_TYPE`) and the fixed seed its random weights
are drawn from, so that the same preset always yields the same weights.
Vocabularies are sized for graftq's byte-level tokenizer (3 specials + 256 bytes), except
`flan-t5-small`, which keeps google/flan-t5-small's exact architecture.
"""

from __future__ import annotations

from typing import Any

BYTE_VOCAB_SIZE = 259  # pad=0, eos=1, unk=2, then the 256 byte values

PRESETS: dict[str, dict[str, Any]] = {
    "t5-tiny": {
        "task_type": "seq2seq",
        "seed": 1234,
        "config": {
            "model_type": "t5", "vocab_size": BYTE_VOCAB_SIZE, "d_model": 64, "d_kv": 16, "d_ff": 128,
            "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "dropout_rate": 0.0, "feed_forward_proj": "relu", "layer_norm_epsilon": 1e-6,
            "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        },
    },
    "flan-t5-small": {
        "task_type": "seq2seq",
        "seed": 1234,
        # google/flan-t5-small's config.json, architecture fields only.
        "config": {
            "model_type": "t5", "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 1024,
            "num_layers": 8, "num_decoder_layers": 8, "num_heads": 6,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "dropout_rate": 0.1, "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6,
            "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
            "initializer_factor": 1.0,
        },
    },
    "gpt2-tiny": {
        "task_type": "causal",
        "seed": 1234,
        "config": {
            "model_type": "gpt2", "vocab_size": BYTE_VOCAB_SIZE, "n_positions": 512, "n_embd": 64,
            "n_layer": 2, "n_head": 4, "n_inner": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0,
        },
    },
    "llama-tiny": {
        "task_type": "causal",
        "seed": 1234,
        "config": {
            "model_type": "llama", "vocab_size": BYTE_VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0,
        },
    },
    "bert-tiny": {
        "task_type": "encoder",
        "seed": 1234,
        "config": {
            "model_type": "bert", "vocab_size": BYTE_VOCAB_SIZE, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 512,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "pad_token_id": 0,
        },
    },
    "roberta-tiny": {
        "task_type": "encoder",
        "seed": 1234,
        # RoBERTa numbers positions from pad_token_id + 1: two more positions than BERT.
        "config": {
            "model_type": "roberta", "vocab_size": BYTE_VOCAB_SIZE, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 514,
            "type_vocab_size": 1, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
        },
    },
    "bart-tiny": {
        "task_type": "seq2seq",
        "seed": 1234,
        "config": {
            "model_type": "bart", "vocab_size": BYTE_VOCAB_SIZE, "d_model": 64, "encoder_layers": 2,
            "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
            "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "max_position_embeddings": 512,
            "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1, "decoder_start_token_id": 0,
            "forced_eos_token_id": None,
        },
    },
    "phi3-tiny": {
        "task_type": "causal",
        "seed": 1234,
        "config": {
            "model_type": "phi3", "vocab_size": BYTE_VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "original_max_position_embeddings": 512, "rms_norm_eps": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0,
        },
    },
    "gemma-tiny": {
        "task_type": "causal",
        "seed": 1234,
        "config": {
            "model_type": "gemma", "vocab_size": BYTE_VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0,
        },
    },
}

PRESET_NAMES = frozenset(PRESETS)
