"""Packing token streams into fixed-length rows with segment ids, and the document-level split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class PackedRows(NamedTuple):
    """N rows of L tokens; segment_ids number the documents within each row from 0."""

    tokens: np.ndarray  # [N, L] int32
    segment_ids: np.ndarray  # [N, L] int32


def pack_documents(documents: Sequence[np.ndarray], row_length: int) -> PackedRows:
    """Documents [T_i] -> rows [N, L=row_length]: the documents' tokens concatenated in order and cut
    every L tokens. Empty documents are skipped; the final partial row is dropped.

    A document that runs past the end of a row continues as segment 0 of the next row.
    """
    packer = RowPacker(row_length)
    for i, doc in enumerate(documents):
        if np.ndim(doc) != 1:
            raise ValueError(f"documents must be 1-D token arrays, document {i} has shape {np.shape(doc)}")
    lengths = np.array([len(doc) for doc in documents], np.int64)
    if lengths.sum() < row_length:
        raise ValueError(f"{int(lengths.sum())} tokens in all documents are fewer than one row of row_length={row_length}")
    packer.add(np.concatenate([np.asarray(doc, np.int32) for doc in documents]), lengths)
    return packer.take(packer.full_rows())


class RowPacker:
    """Documents added in order, in any number of calls -> full rows of row_length tokens: the
    tokens concatenated and cut every row_length, segment ids numbering the non-empty documents
    within each row from 0 (`pack_documents` adds them all at once). Tokens that do not fill a row
    yet are carried; state() and load_state() save and restore them."""

    def __init__(self, row_length: int):
        if isinstance(row_length, bool) or not isinstance(row_length, int) or row_length < 2:
            raise ValueError(f"row_length must be an integer >= 2, got {row_length!r}")
        self.row_length = row_length
        self.tokens = self.ranks = np.zeros(0, np.int32)  # carried tokens and their document's rank
        self.last_rank = -1  # the rank of the last non-empty document added

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """tokens [sum(lengths)]: documents of these lengths [D], concatenated."""
        ranks = self.last_rank + np.cumsum(np.asarray(lengths) > 0, dtype=np.int32)
        self.last_rank = int(ranks[-1]) if len(ranks) else self.last_rank
        self.tokens = np.concatenate([self.tokens, np.asarray(tokens, np.int32)])
        self.ranks = np.concatenate([self.ranks, np.repeat(ranks, lengths)])

    def full_rows(self) -> int:
        return len(self.tokens) // self.row_length

    def take(self, n: int) -> PackedRows:
        """The first n <= full_rows() rows [n, row_length]; the rest stays carried."""
        cut = n * self.row_length
        ranks = self.ranks[:cut].reshape(n, self.row_length)
        rows = PackedRows(self.tokens[:cut].reshape(n, self.row_length), ranks - ranks[:, :1])
        self.tokens, self.ranks = self.tokens[cut:], self.ranks[cut:]
        return rows

    def state(self) -> dict:
        return {"tokens": self.tokens.tolist(), "ranks": self.ranks.tolist(), "last_rank": self.last_rank}

    def load_state(self, state: dict) -> None:
        self.tokens, self.ranks = (np.asarray(state[name], np.int32) for name in ("tokens", "ranks"))
        self.last_rank = int(state["last_rank"])


def split_documents(n_documents: int, validation_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """n documents -> indices (train [n - k], validation [k]) int64, both ascending, k = max(1, round(n *
    validation_fraction)). Validation documents are evenly spaced over the whole corpus, no seed needed.
    """
    if isinstance(n_documents, bool) or not isinstance(n_documents, int) or n_documents < 2:
        raise ValueError(f"n_documents must be an integer >= 2 (one per split at least), got {n_documents!r}")
    if isinstance(validation_fraction, bool) or not 0 < validation_fraction <= 0.5:
        raise ValueError(f"validation_fraction must lie in (0, 0.5], got {validation_fraction!r}")
    k = max(1, round(n_documents * validation_fraction))
    # The middle of each of k equal strides; k < N, so strides span > 1 document and the indices differ.
    validation = ((np.arange(k) + 0.5) * n_documents / k).astype(np.int64)
    train = np.setdiff1d(np.arange(n_documents), validation)
    return train, validation


def target_mask(segment_ids):
    """[N, L] segment ids -> [N, L-1] bool: target j (token j+1 predicted from token j) is scored iff
    both tokens belong to the same document. Works on NumPy and JAX arrays.
    """
    if np.ndim(segment_ids) != 2:
        raise ValueError(f"segment_ids must have rank 2 [N, L], got shape {np.shape(segment_ids)}")
    return segment_ids[:, 1:] == segment_ids[:, :-1]
