"""A byte-level tokenizer that needs no files, for `random:<preset>` models.

Ids follow T5's convention for specials: 0 = pad, 1 = eos, 2 = unk; byte b is id b + 3.
It has a built-in chat template (plain text, see `ByteTokenizer.render_chat`), so that chat data
trains on the presets offline.
"""

from __future__ import annotations

import json
from pathlib import Path

MARKER_FILE = "graftq_tokenizer.json"


class ByteTokenizer:
    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = 2
    offset = 3
    vocab_size = 259
    has_chat_template = True

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """`<|role|>` and a newline, the content and a newline, per message; the generation prompt is
        `<|assistant|>` and a newline."""
        text = "".join(f"<|{message['role']}|>\n{message['content']}\n" for message in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        ids = [byte + self.offset for byte in text.encode("utf-8")]
        return ids[:max_length] if max_length is not None else ids

    def encode_sequence(self, text: str, max_length: int) -> list[int]:
        """The ids a sequence classifier reads: the text, then eos."""
        return self.encode(text, max_length - 1) + [self.eos_token_id]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset and int(i) < 256 + self.offset)
        return data.decode("utf-8", errors="replace")

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory, MARKER_FILE).write_text(json.dumps({"type": "byte", "offset": self.offset}) + "\n")


class HFTokenizer:
    """Adapter giving a Hugging Face tokenizer the small interface graftq's data code uses."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)
        self.vocab_size = len(tokenizer)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as the tokenizer's chat template renders it (text; its special tokens as text)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[:max_length] if max_length is not None else ids

    def encode_sequence(self, text: str, max_length: int) -> list[int]:
        """The ids a sequence classifier reads: with the tokenizer's own special tokens (BERT's
        [CLS] ... [SEP], whose first token the pooler reads), truncated to `max_length`."""
        return self.tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(directory)
