"""A fixed-capacity KV cache per (row, head): keys, values and the tokens' original positions.

Shapes never change as the cache fills, so code that reads or appends compiles once.
Slot i < count holds an entry; slots past count hold zeros and position -1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hamjax.ops import validation


class KVCache(NamedTuple):
    """keys [B, H, C, K]; values [B, H, C, V]; positions [B, H, C] int32; scores [B, H, C] float32
    (the routing score each entry was admitted with); count [B, H] int32."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    scores: jax.Array
    count: jax.Array

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def slot_arrays(self) -> tuple[jax.Array, ...]:
        """keys, values, positions, scores: the arrays with a [B, H, C] entry per slot."""
        return self.keys, self.values, self.positions, self.scores

    @property
    def occupied(self) -> jax.Array:
        """[B, H, C] bool: which slots hold an entry."""
        return jnp.arange(self.capacity) < self.count[..., None]


def init_kv_cache(batch: int, heads: int, capacity: int, key_dim: int, value_dim: int, dtype=jnp.float32):
    """An empty cache."""
    validation.check_nonnegative_int("capacity", capacity)
    return KVCache(
        keys=jnp.zeros((batch, heads, capacity, key_dim), dtype),
        values=jnp.zeros((batch, heads, capacity, value_dim), dtype),
        positions=jnp.full((batch, heads, capacity), -1, jnp.int32),
        scores=jnp.zeros((batch, heads, capacity), jnp.float32),
        count=jnp.zeros((batch, heads), jnp.int32),
    )


def check_cache(cache: KVCache, batch: int, heads: int, key_dim: int, value_dim: int) -> None:
    """Raise ValueError unless `cache` fits inputs of the given sizes."""
    validation.check_rank("cache.keys", cache.keys, 4, "[B, H, C, K]")
    c = cache.keys.shape[2]
    validation.check_shape("cache.keys", cache.keys, (batch, heads, c, key_dim), "[B, H, C, K]")
    validation.check_shape("cache.values", cache.values, (batch, heads, c, value_dim), "[B, H, C, V]")
    validation.check_shape("cache.positions", cache.positions, (batch, heads, c), "[B, H, C]")
    validation.check_shape("cache.scores", cache.scores, (batch, heads, c), "[B, H, C]")
    validation.check_shape("cache.count", cache.count, (batch, heads), "[B, H]")


def append_tokens(cache: KVCache, keys, values, positions, scores, admitted) -> KVCache:
    """Append the admitted tokens of a sequence, in order, after the cache's current entries.

    keys [B, T, H, K]; values [B, T, H, V]; positions [B, T] int; scores, admitted [B, T, H].
    Tokens that do not fit are dropped (admission with `initial_count=cache.count` never
    admits more than fit). A single token is the case T = 1.
    """
    admitted = jnp.asarray(admitted, bool)
    slot = cache.count[:, None, :] + jnp.cumsum(admitted, axis=1, dtype=jnp.int32) - 1  # [B, T, H]
    slot = jnp.where(admitted, slot, cache.capacity)  # out of range: dropped by the scatter
    batch, t, heads = admitted.shape
    b_idx = jnp.arange(batch)[:, None, None]
    h_idx = jnp.arange(heads)[None, None, :]
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32)[..., None], (batch, t, heads))
    return KVCache(
        keys=cache.keys.at[b_idx, h_idx, slot].set(keys.astype(cache.keys.dtype), mode="drop"),
        values=cache.values.at[b_idx, h_idx, slot].set(values.astype(cache.values.dtype), mode="drop"),
        positions=cache.positions.at[b_idx, h_idx, slot].set(positions, mode="drop"),
        scores=cache.scores.at[b_idx, h_idx, slot].set(jnp.asarray(scores, jnp.float32), mode="drop"),
        count=jnp.minimum(cache.count + jnp.sum(admitted, axis=1, dtype=jnp.int32), cache.capacity),
    )


def insert_evicting(cache: KVCache, keys, values, position, scores, candidate):
    """One token per (row, head), keeping the most surprising entries: a candidate takes the next
    free slot, or, when the cache is full, replaces the lowest-scored entry if its score is higher.

    keys [B, H, K]; values [B, H, V]; position [B] int; scores, candidate [B, H].
    Returns (cache, admitted [B, H] bool: the candidates that entered).
    """
    candidate = jnp.asarray(candidate, bool)
    if cache.capacity == 0:
        return cache, jnp.zeros_like(candidate)
    scores = jnp.asarray(scores, jnp.float32)
    full = cache.count >= cache.capacity
    weakest = jnp.argmin(jnp.where(cache.occupied, cache.scores, jnp.inf), axis=-1)  # [B, H]
    weakest_score = jnp.take_along_axis(cache.scores, weakest[..., None], axis=-1)[..., 0]
    admitted = candidate & (~full | (scores > weakest_score))
    slot = jnp.where(admitted, jnp.where(full, weakest, cache.count), cache.capacity)  # capacity: dropped
    batch, heads = slot.shape
    b_idx, h_idx = jnp.arange(batch)[:, None], jnp.arange(heads)[None, :]
    positions = jnp.broadcast_to(jnp.asarray(position, jnp.int32)[:, None], (batch, heads))
    updated = KVCache(
        keys=cache.keys.at[b_idx, h_idx, slot].set(keys.astype(cache.keys.dtype), mode="drop"),
        values=cache.values.at[b_idx, h_idx, slot].set(values.astype(cache.values.dtype), mode="drop"),
        positions=cache.positions.at[b_idx, h_idx, slot].set(positions, mode="drop"),
        scores=cache.scores.at[b_idx, h_idx, slot].set(scores, mode="drop"),
        count=cache.count + (admitted & ~full),
    )
    return updated, admitted


def resize(cache: KVCache, capacity: int) -> KVCache:
    """The same entries in a cache of another capacity (entries past it are dropped)."""
    validation.check_nonnegative_int("capacity", capacity)
    extra = capacity - cache.capacity
    if extra <= 0:
        return KVCache(
            cache.keys[:, :, :capacity],
            cache.values[:, :, :capacity],
            cache.positions[:, :, :capacity],
            cache.scores[:, :, :capacity],
            jnp.minimum(cache.count, capacity),
        )
    pad = lambda x, fill=0: jnp.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)
    return KVCache(pad(cache.keys), pad(cache.values), pad(cache.positions, -1), pad(cache.scores), cache.count)


def clear_rows(cache: KVCache, rows) -> KVCache:
    """The cache with the rows [B] (bool) emptied."""
    empty = init_kv_cache(*cache.keys.shape[:3], cache.keys.shape[3], cache.values.shape[3], cache.keys.dtype)
    pick = lambda e, c: jnp.where(rows.reshape((-1,) + (1,) * (c.ndim - 1)), e, c)
    return KVCache(*(pick(e, c) for e, c in zip(empty, cache)))
