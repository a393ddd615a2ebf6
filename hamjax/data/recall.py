"""Scored targets of the recall tasks (MQAR, pass key): the ignore index and the accuracy metric;
and the recall hits of packed text rows, the targets that recall from earlier in the row can help."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

IGNORE_INDEX = -100  # target of an unscored position


def recall_accuracy(predictions, targets) -> float:
    """Argmax accuracy over the scored positions: predictions [B, T] token ids or logits [B, T, V],
    targets [B, T] with IGNORE_INDEX where unscored -> fraction of scored targets predicted exactly.
    Takes NumPy or JAX arrays.
    """
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.ndim == targets.ndim + 1:
        predictions = predictions.argmax(axis=-1)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions (argmax over the last axis of logits) must match targets [B, T]: "
            f"got {predictions.shape} and {targets.shape}"
        )
    scored = targets != IGNORE_INDEX
    if not scored.any():
        raise ValueError(f"targets hold no scored position (all {targets.size} are {IGNORE_INDEX})")
    return float(np.mean(predictions[scored] == targets[scored]))


def recall_hits(rows, segment_ids, n: int = 2) -> np.ndarray:
    """rows, segment_ids [N, L] (packed rows) -> [N, L-1] bool: target j (token j+1, predicted from
    tokens up to j) is a recall hit iff it is scored (`packing.target_mask`) and the n tokens ending
    at j, all of its document, also end at an earlier position of the same document, so that a
    model that remembers the row can look up what followed them (Zoology's "associative recall
    hits", with the preceding n-gram as the key). NumPy."""
    rows, segment_ids = np.asarray(rows), np.asarray(segment_ids)
    if rows.ndim != 2 or rows.shape != segment_ids.shape:
        raise ValueError(f"rows and segment_ids must both be [N, L], got {rows.shape} and {segment_ids.shape}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (the n-gram before a target), got {n!r}")
    count, length = rows.shape
    hits = np.zeros((count, length - 1), bool)
    if length - 1 < n:
        return hits
    grams = sliding_window_view(rows[:, :-1], n, axis=1)  # [N, L-n, n]: the n tokens ending at j = i + n - 1
    docs = sliding_window_view(segment_ids, n + 1, axis=1)  # the n tokens and the target's document
    whole = np.all(docs == docs[..., -1:], axis=-1)  # [N, L-n]
    row = np.broadcast_to(np.arange(count)[:, None, None], (count, length - n, 1))
    keys = np.concatenate([row, docs[..., -1:], grams], axis=-1)[whole]  # in (row, j) order
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    hits[:, n - 1 :][whole] = np.arange(len(keys)) != first[inverse.reshape(-1)]
    return hits
