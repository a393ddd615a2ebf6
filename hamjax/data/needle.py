"""Pass-key retrieval (a needle in a haystack of real text), in UTF-8 bytes: one token per byte.

Row b is the byte string S of T + 1 bytes

    passage[:d] + NEEDLE(key) + passage[d:] + QUERY + key

where the passage is H = T + 1 - (len(NEEDLE) + len(QUERY) + KEY_DIGITS) consecutive bytes of the corpus
(its documents joined by newlines) from a uniform random start, the key is KEY_DIGITS uniform random
decimal digits, and d is uniform in [0, H]. inputs = S[:-1] and, as for MQAR, targets[t] is the token to
predict after reading inputs[t]: S[t + 1] at the last KEY_DIGITS positions (the key's digits), else
IGNORE_INDEX.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from hamjax.data.corpus import DEFAULT_CORPUS, load_documents
from hamjax.data.recall import IGNORE_INDEX
from hamjax.data.tokenizers import ByteTokenizer
from hamjax.ops.validation import check_nonnegative_int, check_positive_int

NEEDLE = " The pass key is {key}. Remember it. "
QUERY = " What is the pass key? The pass key is "
KEY_DIGITS = 5
# Bytes besides the passage: the needle (with its key), the query and the key again.
FIXED_LENGTH = len(NEEDLE.format(key="0" * KEY_DIGITS)) + len(QUERY) + KEY_DIGITS


def _corpus_tokens(documents: Sequence[str]) -> np.ndarray:
    """N documents -> [L] int32: their bytes, joined by newlines."""
    return ByteTokenizer().encode("\n".join(documents))


@functools.lru_cache(maxsize=1)
def _default_corpus_tokens() -> np.ndarray:
    """[L] int32: the default corpus (the King James Bible), loaded once."""
    tokens = _corpus_tokens(load_documents(DEFAULT_CORPUS)["text"][:])
    tokens.flags.writeable = False
    return tokens


def needle_batch(
    length: int, batch_size: int, seed: int, documents: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (inputs [B, T] int32, targets [B, T] int32, depth [B] float64) with T = length, a pure function
    of its arguments; see the module docstring for the layout. depth = d / H is the fraction of the passage
    before the needle. documents: texts (e.g. load_documents(source)["text"][:]); None is the KJV.
    """
    check_positive_int("length", length)
    check_positive_int("batch_size", batch_size)
    check_nonnegative_int("seed", seed)
    passage_length = length + 1 - FIXED_LENGTH
    if passage_length < 1:
        raise ValueError(
            f"length={length} is too short for the pass-key task: the needle, the query and the key take "
            f"{FIXED_LENGTH} bytes, so length >= {FIXED_LENGTH}"
        )
    corpus = _default_corpus_tokens() if documents is None else _corpus_tokens(documents)
    if len(corpus) < passage_length:
        raise ValueError(
            f"length={length} needs a passage of {passage_length} bytes, more than the corpus's {len(corpus)}"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(corpus) - passage_length + 1, batch_size)
    cuts = rng.integers(0, passage_length + 1, batch_size)
    keys = rng.integers(0, 10, (batch_size, KEY_DIGITS))

    tokenizer = ByteTokenizer()
    query = tokenizer.encode(QUERY)
    rows = []
    for start, cut, key in zip(starts, cuts, keys):
        passage = corpus[start : start + passage_length]
        key_text = "".join(map(str, key))
        needle = tokenizer.encode(NEEDLE.format(key=key_text))
        rows.append(np.concatenate([passage[:cut], needle, passage[cut:], query, tokenizer.encode(key_text)]))
    text = np.stack(rows)
    targets = np.full((batch_size, length), IGNORE_INDEX, np.int32)
    targets[:, -KEY_DIGITS:] = text[:, -KEY_DIGITS:]
    return text[:, :-1], targets, cuts / passage_length
