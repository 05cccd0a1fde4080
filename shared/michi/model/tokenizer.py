"""Text vocabularies: the backbone's own tokens plus a few stream tokens appended after them.

The stream tokens (PAD: "no text this tick", EPAD: "a word starts next tick", BOS/EOS around a text
segment) are not part of any pretrained vocabulary, so they get their own embedding rows and logits
(see `backbone.py`) and their ids start at the base vocabulary size. A pretrained LM stays intact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

STREAM_TOKENS = ("PAD", "EPAD", "BOS", "EOS")
NUM_STREAM_TOKENS = len(STREAM_TOKENS)


class Tokenizer(Protocol):
    base_vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class StreamVocab:
    """Ids of the stream tokens for a given base vocabulary size."""

    def __init__(self, base_vocab_size: int):
        self.base = base_vocab_size
        self.pad, self.epad, self.bos, self.eos = (base_vocab_size + i for i in range(NUM_STREAM_TOKENS))
        self.size = base_vocab_size + NUM_STREAM_TOKENS

    def is_text(self, token: int) -> bool:
        return 0 <= token < self.base


class ByteTokenizer:
    """UTF-8 bytes as tokens: needs no files, works for any language."""

    def __init__(self, base_vocab_size: int = 256):
        if base_vocab_size < 256:
            raise ValueError(f"a byte tokenizer needs a vocabulary of at least 256, got {base_vocab_size}")
        self.base_vocab_size = base_vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer directory (never downloads)."""

    def __init__(self, path: str | Path, base_vocab_size: int):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if len(self._tok) > base_vocab_size:
            raise ValueError(f"tokenizer at {path} has {len(self._tok)} tokens but the backbone only "
                             f"{base_vocab_size}")
        self.base_vocab_size = base_vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([i for i in ids if 0 <= i < self.base_vocab_size])


def load_tokenizer(spec: str, base_vocab_size: int) -> Tokenizer:
    if spec == "bytes":
        return ByteTokenizer(base_vocab_size)
    return HFTokenizer(spec, base_vocab_size)
