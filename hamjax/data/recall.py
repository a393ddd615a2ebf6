"""Scored targets of the recall tasks (MQAR, pass key): the ignore index and the accuracy metric."""

from __future__ import annotations

import numpy as np

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
