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
    if isinstance(row_length, bool) or not isinstance(row_length, int) or row_length < 2:
        raise ValueError(f"row_length must be an integer >= 2, got {row_length!r}")
    for i, doc in enumerate(documents):
        if np.ndim(doc) != 1:
            raise ValueError(f"documents must be 1-D token arrays, document {i} has shape {np.shape(doc)}")
    lengths = np.array([len(doc) for doc in documents], np.int64)
    total = int(lengths.sum())
    n_rows = total // row_length
    if n_rows == 0:
        raise ValueError(f"{total} tokens in all documents are fewer than one row of row_length={row_length}")
    used = n_rows * row_length
    tokens = np.concatenate([np.asarray(doc, np.int32) for doc in documents])[:used]
    document_of_token = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    document_of_token = document_of_token[:used].reshape(n_rows, row_length)
    # Rank among the non-empty documents: consecutive within a row, since empty ones own no token.
    ranks = np.cumsum(lengths > 0, dtype=np.int32) - 1
    segment_ids = ranks[document_of_token] - ranks[document_of_token[:, :1]]
    return PackedRows(tokens.reshape(n_rows, row_length), segment_ids)


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
