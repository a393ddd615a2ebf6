"""Blockwise (flash) attention: `attention.attend`'s masked softmax in blocks of queries and keys.

Each block of queries reads the key blocks one at a time with an online softmax (a running max,
sum and weighted sum of values), so no T x S logits are ever held. What makes it cheap:
- **skipping**: a key block is read only if its valid keys' position and segment ranges meet the
  query block's (causality, the window, packed documents); a skipped block costs a `lax.switch`
  that does nothing, and a block that every query sees whole is read without a mask. The test is
  taken over the whole batch, so it skips the blocks that no row and no head can see. It is exact
  for keys in any order and skips the most when the valid keys lie in position order with the
  empty slots after them, as an ops.KVCache filled by `append_tokens` holds them.
- **recomputation**: the derivative is a rule of its own (`jax.custom_jvp`), computed block by
  block from each query's saved softmax shift and normaliser, the block's weights recomputed in a
  `jax.checkpoint`; reverse mode is JAX's transpose of it. Neither mode keeps a T x S array, so a
  training step's memory grows linearly in T, and `jax.jvp` works as well as `jax.grad`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hamjax.ops import validation
from hamjax.ops.attention import key_mask

QUERY_BLOCK = 512
KEY_BLOCK = 512
_INT_MIN, _INT_MAX = jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max
SKIP, MASKED, FULL = 0, 1, 2  # what a query block does with a key block


def blockwise_attend(
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
    query_block: int | None = None,
    key_block: int | None = None,
):
    """`attention.attend` (same arguments, same result to float32 rounding) computed in blocks of
    `query_block` queries and `key_block` keys (default QUERY_BLOCK and KEY_BLOCK, the best of the
    sizes timed on a 2-core CPU; at most T and S), skipping the key blocks a query block cannot see.

    q [B, T, H, K]; q_positions [B, T]; keys [B, H, S, K]; values [B, H, S, V]; key_positions,
    key_valid [B, H, S]; logit_scale [H]; q_segments [B, T]; key_segments [B, H, S];
    key_log_weights [B, H, S]. Returns [B, T, H, V] float32. q, keys and values enter the products
    in their own dtypes (bfloat16 halves what the backward keeps of them), every product
    accumulating in float32; logits, softmax weights and statistics and the output are float32.
    """
    query_block = QUERY_BLOCK if query_block is None else query_block
    key_block = KEY_BLOCK if key_block is None else key_block
    validation.check_positive_int("query_block", query_block)
    validation.check_positive_int("key_block", key_block)
    if window is not None:
        validation.check_positive_int("window", window)
    batch, t, heads, _ = q.shape
    slots, value_dim = keys.shape[2], values.shape[-1]
    if slots == 0:
        return jnp.zeros((batch, t, heads, value_dim), jnp.float32)
    zeros_bhs = jnp.zeros((batch, heads, slots), jnp.float32)
    q_segments = jnp.zeros((batch, t), jnp.int32) if q_segments is None else jnp.asarray(q_segments, jnp.int32)
    key_segments = zeros_bhs.astype(jnp.int32) if key_segments is None else jnp.asarray(key_segments, jnp.int32)
    learned = key_log_weights is not None
    key_log_weights = zeros_bhs if key_log_weights is None else jnp.asarray(key_log_weights, jnp.float32)

    bq, bk = min(query_block, t), min(key_block, slots)
    n_q, n_k = -(-t // bq), -(-slots // bk)
    # Queries in blocks [n_q, B, bq, ...]; padded queries repeat the last one's position and segment.
    pad_q = lambda x, mode: jnp.pad(x, [(0, 0), (0, n_q * bq - t)] + [(0, 0)] * (x.ndim - 2), mode=mode)
    q_blocks = lambda x: jnp.moveaxis(x.reshape((batch, n_q, bq) + x.shape[2:]), 1, 0)
    q_side = (
        q_blocks(pad_q(jnp.asarray(q), "constant")),
        q_blocks(pad_q(jnp.asarray(q_positions, jnp.int32), "edge")),
        q_blocks(pad_q(q_segments, "edge")),
    )
    # Keys in blocks [n_k, B, H, bk, ...]; padded slots are invalid.
    pad_k = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, n_k * bk - slots)] + [(0, 0)] * (x.ndim - 3))
    k_blocks = lambda x: jnp.moveaxis(x.reshape((batch, heads, n_k, bk) + x.shape[3:]), 2, 0)
    k_side = tuple(
        k_blocks(pad_k(x))
        for x in (
            jnp.asarray(keys),
            jnp.asarray(values),
            jnp.asarray(key_positions, jnp.int32),
            jnp.asarray(key_valid, bool),
            key_segments,
            key_log_weights,
        )
    )
    kinds = _block_kinds(*q_side[1:], *k_side[2:5], window)  # [n_q, n_k]
    out = _attend_blocks(
        q_side[0], *k_side[:2], k_side[5], jnp.asarray(logit_scale, jnp.float32), *q_side[1:], *k_side[2:5], kinds,
        window, learned,
    )
    return jnp.moveaxis(out, 0, 1).reshape(batch, n_q * bq, heads, value_dim)[:, :t]


# The blocked core. q [n_q, B, bq, H, K]; keys [n_k, B, H, bk, K]; values [n_k, B, H, bk, V];
# log_w, k_pos, k_valid, k_seg [n_k, B, H, bk]; scale [H]; q_pos, q_seg [n_q, B, bq]; kinds
# [n_q, n_k]. Output [n_q, B, bq, H, V]. Its derivative is a rule of its own (custom_jvp): the
# tangent is computed block by block, recomputing each block's softmax weights from the saved
# shift and normaliser, so that reverse mode (JAX transposes the tangent) keeps no T x S array.


def _logits(q_i, k_j, log_w, scale, q_pos, q_seg, k_pos, k_valid, k_seg, masked, window, learned):
    """One block's raw scores q . k [B, H, bq, bk], logits (-inf where masked) and mask (None for
    a FULL block, which needs none)."""
    raw = _product("bthk,bhsk->bhts", q_i, k_j)
    logits = raw * scale[:, None, None] + (log_w[:, :, None, :] if learned else 0.0)
    if not masked:
        return raw, logits, None
    mask = key_mask(q_pos, k_pos, k_valid, q_seg, k_seg, window)
    return raw, jnp.where(mask, logits, -jnp.inf), mask


def _product(subscripts: str, a, b):
    """einsum of a and b in their promoted dtype (bf16 only when both are), accumulated and
    returned in float32."""
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


def _by_kind(read):
    """A key step that skips, or reads a MASKED or FULL block with `read(carry, key, masked)`."""

    def step(carry, key):
        *key, kind = key
        branches = [lambda c, _: c, functools.partial(read, masked=True), functools.partial(read, masked=False)]
        return jax.lax.switch(kind, branches, carry, tuple(key)), None

    return step


def _forward(q, keys, values, log_w, scale, q_pos, q_seg, k_pos, k_valid, k_seg, kinds, window, learned):
    """(output [n_q, B, bq, H, V], each query's softmax shift and 1 / normaliser [n_q, B, H, bq],
    with which exp(logit - shift) / normaliser gives its weights: its largest logit (0 for a
    query that sees no key) and the sum of exp(logit - shift) (its inverse 0 where nothing is seen))
    by an online softmax over the key blocks."""

    def query_step(_, query):
        q_i, q_pos_i, q_seg_i, kinds_i = query

        def read(carry, key, masked: bool):
            peak, total, acc = carry
            k_j, v_j, log_w_j, k_pos_j, k_valid_j, k_seg_j = key
            _, logits, mask = _logits(
                q_i, k_j, log_w_j, scale, q_pos_i, q_seg_i, k_pos_j, k_valid_j, k_seg_j, masked, window, learned
            )
            new_peak = jnp.maximum(peak, jnp.max(logits, axis=-1))
            base = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
            weights = jnp.exp(logits - base[..., None])
            weights = jnp.where(mask, weights, 0.0) if masked else weights
            rescale = jnp.exp(peak - base)  # 0 while nothing was seen (peak = -inf)
            acc = acc * rescale[..., None] + _product("bhts,bhsv->bhtv", weights, v_j)
            return new_peak, total * rescale + jnp.sum(weights, axis=-1), acc

        batch, bq, heads = q_i.shape[:3]
        start = (
            jnp.full((batch, heads, bq), -jnp.inf, jnp.float32),
            jnp.zeros((batch, heads, bq), jnp.float32),
            jnp.zeros((batch, heads, bq, values.shape[-1]), jnp.float32),
        )
        (peak, total, acc), _ = jax.lax.scan(_by_kind(read), start, (keys, values, log_w, k_pos, k_valid, k_seg, kinds_i))
        inverse = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
        shift = jnp.where(jnp.isfinite(peak), peak, 0.0)
        return None, (jnp.moveaxis(acc * inverse[..., None], 2, 1), (shift, inverse))

    return jax.lax.scan(query_step, None, (q, q_pos, q_seg, kinds))[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(11, 12))
def _attend_blocks(q, keys, values, log_w, scale, q_pos, q_seg, k_pos, k_valid, k_seg, kinds, window, learned):
    return _forward(q, keys, values, log_w, scale, q_pos, q_seg, k_pos, k_valid, k_seg, kinds, window, learned)[0]


@_attend_blocks.defjvp
def _attend_blocks_jvp(window, learned, primals, tangents):
    """d out_t = sum_j p_tj (d l_tj - sum_j' p_tj' d l_tj') v_j + p_tj d v_j, with l the logits,
    p = exp(l - shift) / normaliser and d l = scale (dq . k + q . dk) + d scale (q . k) + d log_w.
    The weights are recomputed from the forward's shift and normaliser, not from a log-sum-exp,
    so they round as the forward's do."""
    q, keys, values, log_w, scale, q_pos, q_seg, k_pos, k_valid, k_seg, kinds = primals
    dq, dkeys, dvalues, dlog_w, dscale = tangents[:5]
    out, softmax = _forward(*primals, window, learned)

    def query_step(_, query):
        q_i, dq_i, out_i, (shift, inverse), q_pos_i, q_seg_i, kinds_i = query

        def read(carry, key, masked: bool):
            acc, delta = carry
            k_j, dk_j, v_j, dv_j, log_w_j, dlog_w_j, k_pos_j, k_valid_j, k_seg_j = key
            raw, logits, mask = _logits(
                q_i, k_j, log_w_j, scale, q_pos_i, q_seg_i, k_pos_j, k_valid_j, k_seg_j, masked, window, learned
            )
            weights = jnp.exp(logits - shift[..., None]) * inverse[..., None]
            weights = jnp.where(mask, weights, 0.0) if masked else weights
            d_raw = _product("bthk,bhsk->bhts", dq_i, k_j) + _product("bthk,bhsk->bhts", q_i, dk_j)
            d_logits = d_raw * scale[:, None, None] + raw * dscale[:, None, None]
            d_logits = d_logits + dlog_w_j[:, :, None, :] if learned else d_logits
            weighted = weights * d_logits
            acc = acc + _product("bhts,bhsv->bhtv", weighted, v_j) + _product("bhts,bhsv->bhtv", weights, dv_j)
            return acc, delta + jnp.sum(weighted, axis=-1)

        batch, bq, heads = q_i.shape[:3]
        start = (jnp.zeros((batch, heads, bq, values.shape[-1]), jnp.float32), jnp.zeros((batch, heads, bq), jnp.float32))
        # Checkpointed: reverse mode recomputes each block's weights instead of keeping them.
        step = jax.checkpoint(_by_kind(read), prevent_cse=False)
        keys_side = (keys, dkeys, values, dvalues, log_w, dlog_w, k_pos, k_valid, k_seg, kinds_i)
        (acc, delta), _ = jax.lax.scan(step, start, keys_side)
        d_out = jnp.moveaxis(acc, 2, 1) - out_i * jnp.moveaxis(delta, 2, 1)[..., None]
        return None, d_out

    return out, jax.lax.scan(query_step, None, (q, dq, out, softmax, q_pos, q_seg, kinds))[1]


def _block_kinds(q_pos, q_seg, k_pos, k_valid, k_seg, window):
    """[n_q, n_k] int32, per pair of query block i and key block j: SKIP where no row and head of
    j has a valid key whose position and segment ranges meet i's; FULL where in every row and head
    every key of j is valid and seen by every query of i (no mask needed); MASKED otherwise.
    q_pos, q_seg [n_q, B, bq]; k_pos, k_valid, k_seg [n_k, B, H, bk]."""
    lowest = lambda x: jnp.min(jnp.where(k_valid, x, _INT_MAX), axis=-1)[None]  # [1, n_k, B, H]
    highest = lambda x: jnp.max(jnp.where(k_valid, x, _INT_MIN), axis=-1)[None]
    q_range = lambda x: (jnp.min(x, axis=-1)[:, None, :, None], jnp.max(x, axis=-1)[:, None, :, None])
    (q_first, q_last), (seg_first, seg_last) = q_range(q_pos), q_range(q_seg)  # [n_q, 1, B, 1]
    k_first, k_last, k_seg_first, k_seg_last = lowest(k_pos), highest(k_pos), lowest(k_seg), highest(k_seg)
    meets = (k_first <= q_last) & (k_seg_first <= seg_last) & (k_seg_last >= seg_first)
    full = jnp.all(k_valid, axis=-1)[None] & (k_last <= q_first)
    full &= (k_seg_first == k_seg_last) & (seg_first == seg_last) & (k_seg_first == seg_first)
    if window is not None:
        meets &= k_last > q_first - window  # the oldest key any of the queries sees
        full &= k_first > q_last - window
    meets, full = jnp.any(meets, axis=(2, 3)), jnp.all(full, axis=(2, 3))
    return jnp.where(full, FULL, jnp.where(meets, MASKED, SKIP)).astype(jnp.int32)
