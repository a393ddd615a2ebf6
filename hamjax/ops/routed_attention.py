"""Routed attention over a sequence's own tokens: every token a key, masked to the admitted ones,
after the entries of a cache from before the sequence. With every token admitted it is causal
attention (the Transformer's and, with a window, sliding-window layers)."""

from __future__ import annotations

import jax.numpy as jnp

from hamjax.ops.attention import attend, masked_log
from hamjax.ops.blockwise_attention import blockwise_attend


def dense_routed_attention(
    q,
    k,
    v,
    admitted,
    positions,
    *,
    logit_scale,
    segment_ids=None,
    log_weights=None,
    cache=None,
    window: int | None = None,
    blockwise: bool = False,
):
    """Every token is a key, masked to the admitted ones: the T x T reference.

    q, k [B, T, H, K]; v [B, T, H, V]; admitted [B, T, H]; positions [B, T]; log_weights [B, T, H].
    segment_ids [B, T]: keys are seen by queries with an equal id. cache: entries from before this
    call (an ops.KVCache, or any cache with keys, values, positions [B, H, S] and occupied; keys as
    stored), in segment 0, so pass segment indices (`segments.segment_index`) with a
    cache; with log_weights, their bias is the log of their stored scores. window: as in `attend`.
    blockwise: the same result by `blockwise_attend` (blocks of queries read only the key blocks
    they can see, in memory linear in T) instead of one T x S softmax; attention layers use it.
    """
    to_heads = lambda x: jnp.moveaxis(x, 1, 2)  # [B, T, H, ...] -> [B, H, T, ...]
    batch, t, heads = admitted.shape
    per_head = lambda x: jnp.broadcast_to(jnp.asarray(x)[:, None, :], (batch, heads, t))
    segments = jnp.zeros((batch, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
    keys, values, key_positions = to_heads(k), to_heads(v), per_head(positions)
    key_valid, key_segments = to_heads(admitted), per_head(segments)
    key_log_weights = None if log_weights is None else to_heads(log_weights)
    if cache is not None:
        cat = lambda old, new: jnp.concatenate([old, new], axis=2)
        stored = jnp.promote_types(cache.keys.dtype, keys.dtype)  # float32 unless both are bf16
        keys = cat(cache.keys.astype(stored), keys.astype(stored))
        values = cat(cache.values.astype(stored), values.astype(stored))
        key_positions = cat(cache.positions, key_positions)
        key_valid = cat(cache.occupied, key_valid)
        key_segments = cat(jnp.zeros_like(cache.positions), key_segments)
        if log_weights is not None:
            key_log_weights = cat(masked_log(cache.scores, cache.occupied), key_log_weights)
    read = blockwise_attend if blockwise else attend
    return read(
        q,
        positions,
        keys,
        values,
        key_positions,
        key_valid,
        logit_scale=logit_scale,
        q_segments=segments,
        key_segments=key_segments,
        key_log_weights=key_log_weights,
        window=window,
    )
