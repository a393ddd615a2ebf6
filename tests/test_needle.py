"""Pass-key retrieval: rows taken apart into passage, needle, query and key, the passage found in the
corpus, the scored digits against the hidden key, depths spread over the passage, and bad arguments."""

from __future__ import annotations

import re

import numpy as np
import pytest

from hamjax.data import IGNORE_INDEX, load_documents, needle_batch
from hamjax.data.needle import FIXED_LENGTH, KEY_DIGITS, QUERY

NEEDLE = re.compile(rb" The pass key is (\d{5})\. Remember it\. ")


@pytest.fixture(scope="module")
def kjv_documents() -> list[str]:
    return load_documents("kjv")["text"][:]


@pytest.fixture(scope="module")
def kjv_bytes(kjv_documents) -> bytes:
    return "\n".join(kjv_documents).encode()


def _parts(row: np.ndarray) -> tuple[bytes, bytes, bytes, int]:
    """inputs [T] -> (passage before the needle, after it up to the query, the needle's key, needle start)."""
    text = row.astype(np.uint8).tobytes()
    (needle,) = NEEDLE.finditer(text)  # the corpus holds no such sentence: exactly one match
    query = text.rindex(QUERY.encode())
    return text[: needle.start()], text[needle.end() : query], needle.group(1), needle.start()


@pytest.mark.parametrize("length", [FIXED_LENGTH, FIXED_LENGTH + 1, 100, 257, 1000, 4096])
def test_rows_follow_the_definition(length, kjv_bytes):
    inputs, targets, depth = needle_batch(length, batch_size=6, seed=length)
    assert inputs.shape == targets.shape == (6, length) and inputs.dtype == targets.dtype == np.int32
    assert depth.shape == (6,)
    passage_length = length + 1 - FIXED_LENGTH
    for row, target, row_depth in zip(inputs, targets, depth):
        before, after, key, start = _parts(row)
        assert before + after in kjv_bytes and len(before + after) == passage_length
        assert row_depth == start / passage_length
        text = row.astype(np.uint8).tobytes()
        assert text.endswith(QUERY.encode() + key[:-1])
        # targets[t] is the byte after inputs[t]: the key's digits, scored at the last KEY_DIGITS positions.
        assert (target[:-KEY_DIGITS] == IGNORE_INDEX).all()
        assert target[-KEY_DIGITS:].astype(np.uint8).tobytes() == key
        np.testing.assert_array_equal(target[-KEY_DIGITS:-1], row[-KEY_DIGITS + 1 :])


def test_depth_and_passage_spread_over_their_range():
    inputs, _, depth = needle_batch(512, batch_size=400, seed=0)
    quarters = np.bincount(np.minimum(depth * 4, 3).astype(int), minlength=4) / len(depth)
    assert (abs(quarters - 0.25) < 0.07).all(), quarters
    assert depth.min() < 0.02 and depth.max() > 0.98
    assert len({bytes(row[:40].astype(np.uint8)) for row in inputs}) > 390  # distinct passages
    keys = {_parts(row)[2] for row in inputs}
    assert len(keys) > 390 and {k[0] for k in keys} == set(b"0123456789")


def test_default_corpus_is_kjv_and_batches_are_deterministic(kjv_documents):
    first = needle_batch(300, 4, seed=5)
    for a, b in zip(first, needle_batch(300, 4, seed=5, documents=kjv_documents)):
        np.testing.assert_array_equal(a, b)
    other = needle_batch(300, 4, seed=6)
    assert (first[0] != other[0]).mean() > 0.5 and (first[1] != other[1]).any()


def test_documents_are_joined_by_newlines():
    documents = ["alpha beta gamma", "delta epsilon"]
    corpus = "\n".join(documents).encode()
    length = FIXED_LENGTH + len(corpus) - 1  # the passage is the whole corpus
    inputs, _, _ = needle_batch(length, 3, seed=0, documents=documents)
    for row in inputs:
        before, after, _, _ = _parts(row)
        assert before + after == corpus


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=f"length={FIXED_LENGTH - 1} is too short .* length >= {FIXED_LENGTH}"):
        needle_batch(FIXED_LENGTH - 1, 1, 0)
    with pytest.raises(ValueError, match="needs a passage of 31 bytes, more than the corpus's 30"):
        needle_batch(FIXED_LENGTH + 30, 1, 0, documents=["x" * 30])
    with pytest.raises(ValueError, match="length must be a positive integer, got 0"):
        needle_batch(0, 1, 0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        needle_batch(100, 0, 0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        needle_batch(100, 1, -1)
