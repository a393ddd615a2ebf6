"""Routed causal attention: queries attend to the admitted tokens only, by their original positions.

One masked softmax (`attend`, its mask `key_mask`) serves every use: the dense T x T reference
(keys = every token, valid = admitted: ops.routed_attention), the decode step (keys = the KV
cache) and, block by block, `blockwise_attend` (the compacted path and the attention layers). With
every token valid it is plain causal attention, and with a `window` sliding-window attention.
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
    logits, mask = masked_logits(
        q, q_positions, keys, key_positions, key_valid, logit_scale=logit_scale, q_segments=q_segments,
        key_segments=key_segments, key_log_weights=key_log_weights, window=window,
    )
    peak = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)  # no keys at all: -inf
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.where(mask, jnp.exp(logits - peak), 0.0)
    total = jnp.sum(weights, axis=-1)
    out = jnp.einsum("bhts,bhsv->bhtv", weights, jnp.asarray(values, jnp.float32))
    out = jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)
    return jnp.transpose(out, (0, 2, 1, 3))


def masked_logits(
    q,
    q_positions,
    keys,
    key_positions,
    key_valid,
    *,
    logit_scale,
    q_segments=None,
    key_segments=None,
    key_log_weights=None,
    window: int | None = None,
):
    """`attend`'s logits [B, H, T, S] float32 (-inf where masked) and mask [B, H, T, S] bool: the
    keys each query may read. Arguments as in `attend`."""
    q = jnp.asarray(q, jnp.float32)
    logits = jnp.einsum("bthk,bhsk->bhts", q, jnp.asarray(keys, jnp.float32))
    logits = logits * jnp.asarray(logit_scale, jnp.float32)[:, None, None]
    if key_log_weights is not None:
        logits = logits + jnp.asarray(key_log_weights, jnp.float32)[:, :, None, :]
    mask = key_mask(q_positions, key_positions, key_valid, q_segments, key_segments, window)
    return jnp.where(mask, logits, -jnp.inf), mask


def key_mask(q_positions, key_positions, key_valid, q_segments=None, key_segments=None, window: int | None = None):
    """[B, H, T, S] bool: key j is valid, pos_j <= pos_t, (with segments) in t's segment and (with
    a window) pos_j > pos_t - window. Shapes as in `attend`."""
    if window is not None:
        validation.check_positive_int("window", window)
    key_pos, q_pos = jnp.asarray(key_positions)[:, :, None, :], jnp.asarray(q_positions)[:, None, :, None]
    mask = jnp.asarray(key_valid, bool)[:, :, None, :] & (key_pos <= q_pos)
    if window is not None:
        mask &= key_pos > q_pos - window
    if q_segments is not None:
        mask &= jnp.asarray(key_segments)[:, :, None, :] == jnp.asarray(q_segments)[:, None, :, None]
    return mask

def masked_log(scores, valid):
    """log s_j where valid, 0 elsewhere (the learned router's attention bias): no log(0) in the
    forward pass or its gradient."""
    return jnp.log(jnp.where(valid, scores, 1.0))
