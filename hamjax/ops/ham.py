"""The HAM sequence function (parallel form) and the HAM step (recurrent form).

Both compute, per head: the gated delta rule over every token; a routing score (the RNN's
prediction error, or a learned router's score passed in); admission of tokens with score > tau to a
fixed-capacity KV cache; and causal attention over the cache with RoPE at the entries' original
positions. They return the two branch outputs separately: combining them (norms, gates, output
projection) is the layer's job.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hamjax.ops import kv_cache as kv
from hamjax.ops import validation
from hamjax.ops.attention import attend, masked_log
from hamjax.ops.blockwise_attention import blockwise_attend
from hamjax.ops.delta_rule import gated_delta_rule_step, gated_delta_rule_with_errors
from hamjax.ops.rope import apply_rope
from hamjax.ops.routed_attention import dense_routed_attention
from hamjax.ops.routing import admit, kv_fraction, surprise_scores
from hamjax.ops.segments import segment_index

ATTENTION_PATHS = ("compacted", "dense")


class HamState(NamedTuple):
    """What carries from one call to the next: rnn [B, H, K, V] fp32; cache; position [B] int32
    (the position of the next token)."""

    rnn: jax.Array
    cache: kv.KVCache
    position: jax.Array


class HamOutput(NamedTuple):
    """o_rnn, o_attn [B, T, H, V] fp32 (no T axis from the step); the new state; admitted [B, T, H]
    bool; scores [B, T, H]; kv_fraction (scalar) and kv_fraction_per_head [H] of the valid tokens."""

    o_rnn: jax.Array
    o_attn: jax.Array
    state: HamState
    admitted: jax.Array
    scores: jax.Array
    kv_fraction: jax.Array
    kv_fraction_per_head: jax.Array


def init_ham_state(
    batch: int, heads: int, key_dim: int, value_dim: int, capacity: int, cache_dtype=jnp.float32
) -> HamState:
    """Zero RNN state (float32), an empty KV cache whose keys and values are cache_dtype, position 0."""
    return HamState(
        rnn=jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32),
        cache=kv.init_kv_cache(batch, heads, capacity, key_dim, value_dim, cache_dtype),
        position=jnp.zeros((batch,), jnp.int32),
    )


def ham_sequence(
    q,
    k,
    v,
    g,
    beta,
    state: HamState | None,
    *,
    tau,
    logit_scale,
    capacity: int | None = None,
    router_scores=None,
    valid=None,
    segment_ids=None,
    rope_theta: float | None = 10000.0,
    attention: str = "compacted",
    method: str = "chunk",
    chunk_size: int = 64,
    cache_dtype=jnp.float32,
) -> HamOutput:
    """A HAM layer's core over a sequence, in parallel form.

    q, k [B, T, H, K] (L2-normalised); v [B, T, H, V]; g, beta [B, T, H]; state from
    `init_ham_state` or a previous call, or None to start empty with a cache of `capacity` slots
    (training: attention then reads no cache entries from before the call, which an empty
    `init_ham_state` cache would pay for); tau a scalar or [H]; logit_scale [H]; router_scores
    [B, T, H] in (0, 1] for the learned router (None: surprise router); valid [B, T] (False =
    padding: no RNN update, never admitted); segment_ids [B, T] (packed sequences: a new segment
    resets the RNN state and empties the cache). cache_dtype: the keys and values of the cache
    started when state is None (else the state's own); attention reads every key and value
    rounded to the cache's dtype, as a decode that stores them first does.

    attention="dense" is the T x T reference; "compacted" gathers the cache's entries and the
    admitted tokens of every segment, in position order, into a buffer with room for all of them
    (the cache capacity; with segment_ids T more, as each segment may fill a cache of its own;
    from an empty start at most T) and attends to it blockwise (ops.blockwise_attend): each block
    of queries reads only the key blocks it can see, so the work follows the admitted tokens and
    the memory grows linearly in T.
    """
    fresh = state is None
    if fresh:
        if capacity is None:
            raise ValueError("ham_sequence needs the cache capacity when state is None")
        validation.check_positive_int("capacity", capacity)
        validation.check_rank("q", q, 4, "[B, T, H, K]")
        state = init_ham_state(q.shape[0], q.shape[2], q.shape[3], v.shape[-1], capacity, cache_dtype)
    elif capacity is not None and capacity != state.cache.capacity:
        raise ValueError(f"capacity {capacity} differs from the state's cache capacity {state.cache.capacity}")
    _check_sequence_args(q, v, state, tau, logit_scale, router_scores, valid, attention)
    batch, t = q.shape[:2]
    valid = jnp.ones((batch, t), bool) if valid is None else jnp.asarray(valid, bool)
    positions = state.position[:, None] + jnp.arange(t, dtype=jnp.int32)
    rnn, scores, admitted = _route(
        q, k, v, g, beta, state, tau, router_scores, valid, segment_ids, method=method, chunk_size=chunk_size
    )
    rope_positions = positions[:1] if fresh else positions  # from an empty start every row has 0..T-1
    q_rot, k_rot = (x if rope_theta is None else apply_rope(x, rope_positions, rope_theta) for x in (q, k))
    stored = state.cache.keys.dtype, state.cache.values.dtype
    tokens = _Tokens(
        k_rot.astype(stored[0]), v.astype(stored[1]), positions, scores, admitted, _segment_index(segment_ids, batch, t)
    )
    cache, learned = None if fresh else state.cache, router_scores is not None
    if attention == "dense":
        o_attn = _attend_dense(q_rot, tokens, cache, logit_scale, learned)
    else:
        size = _buffer_size(state.cache.capacity, t, segmented=segment_ids is not None, fresh=fresh)
        o_attn = _attend_compacted(q_rot, tokens, cache, state.position, logit_scale, learned, size)
    fraction, per_head = kv_fraction(admitted, valid)
    new_state = HamState(rnn.state, _hand_on(state.cache, tokens), state.position + t)
    return HamOutput(rnn.output, o_attn, new_state, admitted, scores, fraction, per_head)


class _Tokens(NamedTuple):
    """A call's tokens as the attention sees them: keys [B, T, H, K] (RoPE applied), values
    [B, T, H, V], positions [B, T], scores and admitted [B, T, H], segments [B, T] (segment index)."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    scores: jax.Array
    admitted: jax.Array
    segments: jax.Array


def _route(q, k, v, g, beta, state: HamState, tau, router_scores, valid, segment_ids, *, method, chunk_size):
    """The RNN over every token, each token's routing score, and which tokens enter the cache.
    Returns (DeltaRuleResult with fp32 output, scores [B, T, H], admitted [B, T, H])."""
    rnn = gated_delta_rule_with_errors(
        q,
        k,
        v,
        jnp.where(valid[..., None], g, 0.0),
        jnp.where(valid[..., None], beta, 0.0),
        initial_state=state.rnn,
        method=method,
        chunk_size=chunk_size,
        segment_ids=segment_ids,
        output_dtype=jnp.float32,
    )
    scores = surprise_scores(rnn.errors) if router_scores is None else jnp.asarray(router_scores, jnp.float32)
    admitted = admit(
        scores, tau, state.cache.capacity, valid=valid, segment_ids=segment_ids, initial_count=state.cache.count
    )
    return rnn, scores, admitted


def _attend_dense(q, tokens: _Tokens, cache: kv.KVCache | None, logit_scale, learned: bool):
    """The T x T reference: q [B, T, H, K] over the cache's entries (None: none) and the admitted
    tokens."""
    log_weights = masked_log(tokens.scores, tokens.admitted) if learned else None
    return dense_routed_attention(
        q, tokens.keys, tokens.values, tokens.admitted, tokens.positions, logit_scale=logit_scale,
        segment_ids=tokens.segments, log_weights=log_weights, cache=cache,
    )


def _buffer_size(capacity: int, t: int, *, segmented: bool, fresh: bool) -> int:
    """Room for every entry the compacted attention may read: one cache's capacity, T more with
    segment ids (each later segment fills a cache of its own, at most with its own tokens); from an
    empty start never more than T."""
    size = capacity + t if segmented else capacity
    return min(size, t) if fresh else size


def _attend_compacted(q, tokens: _Tokens, cache: kv.KVCache | None, start, logit_scale, learned: bool, size: int):
    """q [B, T, H, K] over a buffer of `size` slots holding the cache's entries (None: none) and the
    admitted tokens of every segment, in position order, read blockwise (ops.blockwise_attend).
    start [B]: the position of the call's first token."""
    batch, _, heads, dk = q.shape
    if cache is None:
        buffer = kv.init_kv_cache(batch, heads, size, dk, tokens.values.shape[-1], tokens.keys.dtype)
    else:
        buffer = kv.resize(cache, size)
    buffer = kv.append_tokens(buffer, tokens.keys, tokens.values, tokens.positions, tokens.scores, tokens.admitted)
    return blockwise_attend(
        q,
        tokens.positions,
        buffer.keys,
        buffer.values,
        buffer.positions,
        buffer.occupied,
        logit_scale=logit_scale,
        q_segments=tokens.segments,
        key_segments=_key_segments(buffer.positions, start, tokens.segments),
        key_log_weights=masked_log(buffer.scores, buffer.occupied) if learned else None,
    )


def _hand_on(cache: kv.KVCache, tokens: _Tokens) -> kv.KVCache:
    """The cache the next call continues from: the last segment's entries, so the incoming ones
    only if no segment started in this call."""
    last = tokens.segments[:, -1]
    in_last = (tokens.segments == last[:, None])[..., None]
    return kv.append_tokens(
        kv.clear_rows(cache, last > 0), tokens.keys, tokens.values, tokens.positions, tokens.scores,
        tokens.admitted & in_last,
    )


def ham_step(
    q,
    k,
    v,
    g,
    beta,
    state: HamState,
    *,
    tau,
    logit_scale,
    router_score=None,
    valid=None,
    rope_theta: float | None = 10000.0,
    evict: bool = False,
) -> HamOutput:
    """One token in recurrent form: q, k [B, H, K]; v [B, H, V]; g, beta [B, H]; router_score
    [B, H] or None; valid [B]. Same meaning as `ham_sequence` (no segments: decoding is one
    document per row). Outputs drop the T axis.

    evict=False stops admitting when the cache is full (the training rule); evict=True lets a token
    with score > tau replace the cache's least-surprising entry when its score is higher
    (kv_cache.insert_evicting), so the cache keeps the most surprising tokens seen."""
    _check_step_args(q, v, state, tau, logit_scale, router_score, valid)
    batch = q.shape[0]
    valid = jnp.ones((batch,), bool) if valid is None else jnp.asarray(valid, bool)
    o_rnn, rnn, error = gated_delta_rule_step(
        q, k, v, jnp.where(valid[:, None], g, 0.0), jnp.where(valid[:, None], beta, 0.0), state.rnn,
        output_dtype=jnp.float32,
    )
    score = surprise_scores(error) if router_score is None else jnp.asarray(router_score, jnp.float32)
    cache = state.cache
    candidate = (score > jnp.asarray(tau, jnp.float32)) & valid[:, None]
    position = state.position[:, None]  # [B, 1]
    q_rot, k_rot = (
        x[:, None] if rope_theta is None else apply_rope(x[:, None], position, rope_theta) for x in (q, k)
    )
    if evict:
        cache, admitted = kv.insert_evicting(cache, k_rot[:, 0], v, state.position, score, candidate)
    else:
        admitted = candidate & (cache.count < cache.capacity)
        cache = kv.append_tokens(cache, k_rot, v[:, None], position, score[:, None], admitted[:, None])
    o_attn = attend(
        q_rot,
        position,
        cache.keys,
        cache.values,
        cache.positions,
        cache.occupied,
        logit_scale=logit_scale,
        key_log_weights=None if router_score is None else masked_log(cache.scores, cache.occupied),
    )[:, 0]
    fraction, per_head = kv_fraction(admitted[:, None], valid[:, None])
    return HamOutput(
        o_rnn, o_attn, HamState(rnn, cache, state.position + 1), admitted, score, fraction, per_head
    )


def _check_sequence_args(q, v, state, tau, logit_scale, router_scores, valid, attention):
    validation.check_choice("attention", attention, ATTENTION_PATHS)
    validation.check_rank("q", q, 4, "[B, T, H, K]")
    batch, t, heads, dk = q.shape
    _check_common(batch, heads, dk, v.shape[-1], state, tau, logit_scale)
    if router_scores is not None:
        validation.check_shape("router_scores", router_scores, (batch, t, heads), "[B, T, H]")
    if valid is not None:
        validation.check_shape("valid", valid, (batch, t), "[B, T]")


def _check_step_args(q, v, state, tau, logit_scale, router_score, valid):
    validation.check_rank("q", q, 3, "[B, H, K]")
    batch, heads, dk = q.shape
    _check_common(batch, heads, dk, v.shape[-1], state, tau, logit_scale)
    if router_score is not None:
        validation.check_shape("router_score", router_score, (batch, heads), "[B, H]")
    if valid is not None:
        validation.check_shape("valid", valid, (batch,), "[B]")


def _check_common(batch, heads, dk, dv, state, tau, logit_scale):
    validation.check_not_nan("tau", tau)
    if jnp.ndim(tau) not in (0, 1) or jnp.size(tau) not in (1, heads):
        raise ValueError(f"tau must be a scalar or have shape [H] = ({heads},), got shape {jnp.shape(tau)}")
    validation.check_shape("logit_scale", logit_scale, (heads,), "[H]")
    validation.check_shape("state.rnn", state.rnn, (batch, heads, dk, dv), "[B, H, K, V]")
    validation.check_shape("state.position", state.position, (batch,), "[B]")
    kv.check_cache(state.cache, batch, heads, dk, dv)


def _segment_index(segment_ids, batch: int, t: int):
    """[B, T] int32 segment index (all 0 without segment ids)."""
    if segment_ids is None:
        return jnp.zeros((batch, t), jnp.int32)
    return segment_index(segment_ids)


def _key_segments(key_positions, start, index):
    """Segment index of each buffered key [B, H, S], looked up by its position in `index` [B, T];
    entries from before this call (position < start) continue segment 0."""
    offset = jnp.clip(key_positions - start[:, None, None], 0, index.shape[1] - 1)
    batch = jnp.arange(index.shape[0])[:, None, None]
    return jnp.where(key_positions < start[:, None, None], 0, index[batch, offset])
