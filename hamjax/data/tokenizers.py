"""Tokenizers: raw UTF-8 bytes by default, or any Hugging Face tokenizer (needs `transformers`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer; token ids lie in [0, vocab_size)."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """One token per UTF-8 byte: vocab 256, no training, no unknown tokens."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """str -> [T] int32, the UTF-8 bytes of `text`."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """N strings -> N arrays [T_i] int32."""
        return [self.encode(text) for text in texts]

    def decode(self, ids) -> str:
        """[T] ids in [0, 256) -> str; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"byte token ids must lie in [0, 256), got range [{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A `transformers.AutoTokenizer` (hub name or local directory); special tokens are not added."""

    def __init__(self, name_or_path: str):
        try:
            import transformers
        except ImportError as err:
            raise ImportError(
                f"tokenizer {name_or_path!r} needs Hugging Face transformers: pip install transformers "
                f"(or use the default tokenizer 'bytes')"
            ) from err
        self.name = name_or_path
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        self.vocab_size = len(self._tokenizer)

    def encode(self, text: str) -> np.ndarray:
        """str -> [T] int32 token ids."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """N strings -> N arrays [T_i] int32 (one call into the fast tokenizer)."""
        ids = self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [np.asarray(row, np.int32) for row in ids]

    def decode(self, ids) -> str:
        """[T] token ids -> str."""
        return self._tokenizer.decode(np.asarray(ids).tolist())


def load_tokenizer(name: str) -> Tokenizer:
    """"bytes" -> ByteTokenizer; anything else is a Hugging Face tokenizer name or local path."""
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)
