"""Packed sequences: segment ids mark documents; a new segment resets the RNN state and the KV cache."""

from __future__ import annotations

import jax.numpy as jnp


def segment_starts(segment_ids):
    """[B, T] ids -> [B, T] bool, True where a token's id differs from the previous token's.

    Token 0 never starts a segment: it continues whatever state or cache is passed in.
    """
    segment_ids = jnp.asarray(segment_ids)
    first = jnp.zeros_like(segment_ids[:, :1], bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def segment_index(segment_ids):
    """[B, T] ids -> [B, T] int32: 0 for tokens continuing the incoming state, +1 at each start."""
    return jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)
