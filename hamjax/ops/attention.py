"""Routed causal attention: queries attend to the admitted tokens only, by their original positions.

One masked softmax (`attend`) serves all three uses: the dense T x T reference (keys = every token,
valid = admitted), the compacted path (keys = a buffer holding only the admitted tokens) and the
decode step (keys = the KV cache). With every token valid it is plain causal attention, and with a
`window` sliding-window attention.
"""

from __future__ import annotations

import jax.numpy as jnp

from hamjax.ops import validation


def attend(
    q,
    q_positions,
    keys,
    values,
    key_positions,
    key_valid,
    *,
    logit_scale,
    q_segments=None,
    key_segments=None,
    key_log_weights=None,
    window: int | None = None,
):
    """softmax_j(logit_scale_h * q_t . k_j + log w_j) v_j over keys j with valid_j, pos_j <= pos_t,
    (when segments are given) the same segment as t and (when `window` is given) pos_t - window <
    pos_j: a sliding window of `window` positions, t's own included. Queries that see no key get 0.

    q [B, T, H, K]; q_positions [B, T]; keys [B, H, S, K]; values [B, H, S, V]; key_positions,
    key_valid [B, H, S]; logit_scale [H]; q_segments [B, T]; key_segments [B, H, S];
    key_log_weights [B, H, S] (learned router: log s_j). Returns [B, T, H, V] float32.
    """
    if window is not None:
        validation.check_positive_int("window", window)
    q = jnp.asarray(q, jnp.float32)
    logits = jnp.einsum("bthk,bhsk->bhts", q, jnp.asarray(keys, jnp.float32))
    logits = logits * jnp.asarray(logit_scale, jnp.float32)[:, None, None]
    if key_log_weights is not None:
        logits = logits + jnp.asarray(key_log_weights, jnp.float32)[:, :, None, :]
    key_pos, q_pos = jnp.asarray(key_positions)[:, :, None, :], jnp.asarray(q_positions)[:, None, :, None]
    mask = jnp.asarray(key_valid, bool)[:, :, None, :] & (key_pos <= q_pos)
    if window is not None:
        mask &= key_pos > q_pos - window
    if q_segments is not None:
        mask &= jnp.asarray(key_segments)[:, :, None, :] == jnp.asarray(q_segments)[:, None, :, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)  # no keys at all: -inf
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.where(mask, jnp.exp(logits - peak), 0.0)
    total = jnp.sum(weights, axis=-1)
    out = jnp.einsum("bhts,bhsv->bhtv", weights, jnp.asarray(values, jnp.float32))
    out = jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)
    return jnp.transpose(out, (0, 2, 1, 3))


def masked_log(scores, valid):
    """log s_j where valid, 0 elsewhere (the learned router's attention bias): no log(0) in the
    forward pass or its gradient."""
    return jnp.log(jnp.where(valid, scores, 1.0))


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
    query_block: int | None = None,
):
    """The T x T reference: every token is a key, masked to the admitted ones.

    q, k [B, T, H, K]; v [B, T, H, V]; admitted [B, T, H]; positions [B, T]; log_weights [B, T, H].
    segment_ids [B, T]: keys are seen by queries with an equal id. cache: entries from before this
    call (an ops.KVCache, or any cache with keys, values, positions [B, H, S] and occupied; keys as
    stored), in segment 0, so pass segment indices (`segments.segment_index`) with a
    cache; with log_weights, their bias is the log of their stored scores. window: as in `attend`.
    query_block (without a cache, for positions that increase along T, as start + arange(T) does):
    queries go in blocks of this many, each reading only the keys it can see (none after the
    block, none before its window), the same result for about half the work of the T x T square.
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
        keys = cat(cache.keys.astype(jnp.float32), keys.astype(jnp.float32))
        values = cat(cache.values.astype(jnp.float32), values.astype(jnp.float32))
        key_positions = cat(cache.positions, key_positions)
        key_valid = cat(cache.occupied, key_valid)
        key_segments = cat(jnp.zeros_like(cache.positions), key_segments)
        if log_weights is not None:
            key_log_weights = cat(masked_log(cache.scores, cache.occupied), key_log_weights)
    key_side = (keys, values, key_positions, key_valid, key_segments, key_log_weights)  # S on axis 2

    def read(first_query, end, keep):
        """Queries first_query..end-1 (clipped to T) against the keys in slice `keep`."""
        k_, v_, k_pos, k_valid, k_seg, k_log_w = (None if x is None else x[:, :, keep] for x in key_side)
        return attend(
            q[:, first_query:end],
            positions[:, first_query:end],
            k_,
            v_,
            k_pos,
            k_valid,
            logit_scale=logit_scale,
            q_segments=segments[:, first_query:end],
            key_segments=k_seg,
            key_log_weights=k_log_w,
            window=window,
        )

    if query_block is None:
        return read(0, t, slice(None))
    validation.check_positive_int("query_block", query_block)
    if cache is not None:
        raise ValueError("query_block needs keys aligned with the queries: it cannot be used with a cache")
    first_key = lambda a: 0 if window is None else max(0, a - window + 1)
    blocks = [read(a, a + query_block, slice(first_key(a), a + query_block)) for a in range(0, t, query_block)]
    return jnp.concatenate(blocks, axis=1)


def causal_query_block(t: int) -> int:
    """dense_routed_attention's query_block for T tokens without a cache: 64 rows, or T/8 from
    T = 512 up (at most 8 blocks to compile), the best of the block sizes timed on a 2-core CPU
    from T = 256 to 4096; `hamjax bench` measures the layers and training steps that use it."""
    return max(64, -(-t // 8))
