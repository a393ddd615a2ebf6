"""hamjax.ops.blockwise_attention: attention in blocks of queries and keys (online softmax, skipped
blocks, a derivative rule of its own) against the float64 masked-softmax oracle and `attend`, in
both differentiation modes, and its compiled memory in T (DESIGN.md §1.3, §1.5)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hamjax import ops
from hamjax.bench.common import count_every_buffer, loglog_slope
from hamjax.ops import blockwise_attention as bw
from hamjax.ops import kv_cache as kv
from oracles import assert_close, masked_attention_reference, masked_attention_reference_jax, unit

TOL = 1e-5  # relative RMS error allowed for float32 against the float64 oracle
B, T, H, K, V, S = 2, 37, 3, 6, 5, 29
LOGIT_SCALE = np.array([2.0, 6.0, 12.0], np.float32)
BLOCKS = [(1, 1), (4, 3), (7, 5), (16, 29), (64, 64)]  # short last blocks, one block, blocks of 1


def make_case(seed, layout):
    """Queries at positions 10..46 in two segments per row (split at different places), S keys.
    layout "buffer": keys as a compacted buffer holds them (a valid prefix in position order, each
    row and head its own count, one (row, head) empty); "scattered": valid keys at random positions
    in random slots. Both with learned-router log weights. Unit queries and keys, as HAM's are: the
    logits are at most the logit scale plus the log weights."""
    rng = np.random.default_rng(seed)
    q_positions = np.broadcast_to(10 + np.arange(T, dtype=np.int32), (B, T))
    split = np.array([[22], [35]])  # the position where each row's second segment starts
    if layout == "buffer":
        key_positions = np.sort(rng.choice(np.arange(5, 47), (B, H, S)), axis=-1).astype(np.int32)
        count = rng.integers(S // 2, S + 1, (B, H))
        count[1, 2] = 0
        key_valid = np.arange(S) < count[..., None]
    else:
        key_positions = rng.integers(0, 50, (B, H, S)).astype(np.int32)
        key_valid = rng.random((B, H, S)) < 0.7
    args = dict(
        q=unit(rng.standard_normal((B, T, H, K))),
        q_positions=q_positions,
        keys=unit(rng.standard_normal((B, H, S, K))),
        values=rng.standard_normal((B, H, S, V)).astype(np.float32),
        key_positions=key_positions,
        key_valid=key_valid,
    )
    kwargs = dict(
        logit_scale=LOGIT_SCALE,
        q_segments=(q_positions >= split).astype(np.int32),
        key_segments=(key_positions >= split[:, :, None]).astype(np.int32),
        key_log_weights=np.log(rng.uniform(0.05, 1.0, (B, H, S))).astype(np.float32),
    )
    return args, kwargs


def oracle_mask(args, kwargs, window):
    mask = ops.attention.key_mask(args["q_positions"], args["key_positions"], args["key_valid"],
                                  kwargs["q_segments"], kwargs["key_segments"], window)
    return np.asarray(mask)


DIFFERENTIABLE = ("q", "keys", "values", "key_log_weights", "logit_scale")


def split_inputs(args, kwargs):
    merged = {**args, **kwargs}
    return [merged[n] for n in DIFFERENTIABLE], merged


def blockwise_fn(merged, window, blocks):
    def f(*xs):
        inputs = {**merged, **dict(zip(DIFFERENTIABLE, xs))}
        return ops.blockwise_attend(**inputs, window=window, query_block=blocks[0], key_block=blocks[1])
    return jax.jit(f)


def oracle_fn(merged, mask):
    def f(q, keys, values, log_w, scale):
        return masked_attention_reference_jax(q, keys, values, mask, scale, log_w)
    return f


@pytest.mark.parametrize("layout", ["buffer", "scattered"])
@pytest.mark.parametrize("window", [None, 6], ids=["causal", "window6"])
@pytest.mark.parametrize("blocks", BLOCKS, ids=[f"q{a}_k{b}" for a, b in BLOCKS])
def test_matches_float64_oracle_outputs_and_gradients(blocks, window, layout):
    """Output and the gradient of every float input equal the float64 oracle's; segments, windows,
    invalid slots, a (row, head) with no key, and blocks that straddle segment and buffer ends."""
    args, kwargs = make_case(0, layout)
    xs, merged = split_inputs(args, kwargs)
    mask = oracle_mask(args, kwargs, window)
    cotangent = np.random.default_rng(1).standard_normal((B, T, H, V))
    out, vjp = jax.vjp(blockwise_fn(merged, window, blocks), *xs)
    chex.assert_type(out, jnp.float32)
    expected = masked_attention_reference(args["q"], args["keys"], args["values"], mask, LOGIT_SCALE,
                                          kwargs["key_log_weights"])
    assert_close(out, expected, "output")
    grads = vjp(jnp.asarray(cotangent, jnp.float32))
    with jax.enable_x64(True):
        _, oracle_vjp = jax.vjp(oracle_fn(merged, mask), *(np.asarray(x, np.float64) for x in xs))
        want = oracle_vjp(cotangent)
    for name, got, w in zip(DIFFERENTIABLE, grads, want):
        assert_close(got, np.asarray(w), f"d/d{name}")


@pytest.mark.parametrize("window", [None, 6], ids=["causal", "window6"])
def test_forward_mode_equals_the_oracle(window):
    """jax.jvp (the derivative rule itself) in a random direction of every float input equals the
    float64 oracle's, and jax.jacfwd runs."""
    args, kwargs = make_case(2, "buffer")
    xs, merged = split_inputs(args, kwargs)
    mask = oracle_mask(args, kwargs, window)
    rng = np.random.default_rng(3)
    directions = [rng.standard_normal(np.shape(x)).astype(np.float32) for x in xs]
    _, tangent = jax.jvp(blockwise_fn(merged, window, (8, 5)), xs, directions)
    with jax.enable_x64(True):
        _, want = jax.jvp(oracle_fn(merged, mask), [np.asarray(x, np.float64) for x in xs],
                          [np.asarray(d, np.float64) for d in directions])
    assert_close(tangent, np.asarray(want), "jvp")
    scale_jacobian = jax.jacfwd(lambda s: blockwise_fn(merged, window, (8, 5))(*xs[:4], s))(xs[4])
    chex.assert_shape(scale_jacobian, (B, T, H, V, H))


def test_blind_queries_read_zero_with_finite_gradients():
    """Queries that see no key (before every key, or in an empty (row, head)) read 0 and put no
    NaN in any gradient."""
    args, kwargs = make_case(4, "buffer")
    args["key_positions"] = args["key_positions"] + 20  # the first queries now precede every key
    xs, merged = split_inputs(args, kwargs)
    out, vjp = jax.vjp(blockwise_fn(merged, None, (4, 3)), *xs)
    blind = ~oracle_mask(args, kwargs, None).any(-1)  # [B, H, T]
    assert blind.any() and (~blind).any()
    assert not np.asarray(out)[np.moveaxis(blind, 1, 2)].any()
    for name, grad in zip(DIFFERENTIABLE, vjp(jnp.ones_like(out))):
        assert np.isfinite(np.asarray(grad)).all(), f"d/d{name} has non-finite values"


def test_block_kinds():
    """Skip, masked or full, per (query block, key block), for a causal compacted buffer in two
    segments: key blocks past every row's count and after the query block are skipped, blocks
    wholly in the past of the query block's segment need no mask, and a window skips old blocks."""
    # One row, one head; queries 0..15 in blocks of 4; keys: positions 0..7 (segment 0) then 8..11
    # (segment 1) in blocks of 4, then 4 empty slots.
    q_pos = np.arange(16, dtype=np.int32).reshape(4, 1, 4)
    q_seg = (q_pos >= 8).astype(np.int32)
    k_pos = np.concatenate([np.arange(12), np.zeros(4)]).astype(np.int32).reshape(4, 1, 1, 4)
    k_valid = (np.arange(16) < 12).reshape(4, 1, 1, 4)
    k_seg = (k_pos >= 8).astype(np.int32) * k_valid
    skip, masked, full = bw.SKIP, bw.MASKED, bw.FULL
    kinds = np.asarray(bw._block_kinds(q_pos, q_seg, k_pos, k_valid, k_seg, None))
    np.testing.assert_array_equal(kinds, [[masked, skip, skip, skip],
                                          [full, masked, skip, skip],
                                          [skip, skip, masked, skip],
                                          [skip, skip, full, skip]])
    windowed = np.asarray(bw._block_kinds(q_pos, q_seg, k_pos, k_valid, k_seg, 3))
    np.testing.assert_array_equal(windowed[1], [masked, masked, skip, skip])  # queries 4..7 see 2..7
    np.testing.assert_array_equal(windowed[3], [skip, skip, masked, skip])    # queries 12..15 see 10, 11


def test_compacted_buffer_of_the_admitted_tokens_equals_dense():
    """Attending to a buffer of only the admitted tokens (kv_cache.append_tokens: position order,
    room for every token) equals dense routed attention over every token masked to the admitted."""
    rng = np.random.default_rng(5)
    q, k = rng.standard_normal((2, B, T, H, K)).astype(np.float32)
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    admitted = rng.random((B, T, H)) < 0.3
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    buffer = kv.append_tokens(ops.init_kv_cache(B, H, T, K, V), k, v, positions, np.ones((B, T, H)), admitted)
    got = ops.blockwise_attend(q, positions, buffer.keys, buffer.values, buffer.positions, buffer.occupied,
                               logit_scale=LOGIT_SCALE, query_block=8, key_block=4)
    want = ops.dense_routed_attention(q, k, v, admitted, positions, logit_scale=LOGIT_SCALE)
    assert_close(got, np.asarray(want, np.float64), "compacted vs dense", tol=1e-6)


def test_no_key_slots_read_zero():
    q = jnp.ones((2, 3, 2, 4), jnp.float32)
    out = ops.blockwise_attend(q, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 2, 0, 4)), jnp.zeros((2, 2, 0, 5)),
                               jnp.zeros((2, 2, 0), jnp.int32), jnp.zeros((2, 2, 0), bool), logit_scale=jnp.ones(2))
    chex.assert_shape(out, (2, 3, 2, 5))
    assert not np.asarray(out).any()


@pytest.mark.parametrize("name", ["query_block", "key_block", "window"])
def test_bad_block_sizes_raise(name):
    args, kwargs = make_case(0, "buffer")
    with pytest.raises(ValueError, match=f"^{name}\\b.*0"):
        ops.blockwise_attend(**args, **kwargs, **{name: 0})


def temp_bytes(attention, t: int) -> int:
    """XLA's temp bytes of the compiled gradient of sum(attention(...)^2), causal, B=1, H=2, K=V=16."""
    shape = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)

    def loss(q, k, v):
        positions = jnp.arange(t, dtype=jnp.int32)[None]
        every = jnp.ones((1, t, 2), bool)
        return jnp.sum(attention(q, k, v, every, positions, logit_scale=jnp.ones(2)) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape)
    return compiled.compile(compiler_options=count_every_buffer()).memory_analysis().temp_size_in_bytes


def test_compiled_temp_memory_grows_linearly_in_t():
    """The backward keeps no T x T array: the gradient's temp bytes grow as T^1.15 or less from 1k
    to 4k, where the one-block T x T softmax's grow as T^2 (so the test can tell them apart)."""
    lengths = [1024, 2048, 4096]
    blockwise = functools.partial(ops.dense_routed_attention, blockwise=True)
    slope = loglog_slope(lengths, [temp_bytes(blockwise, t) for t in lengths])
    dense_slope = loglog_slope(lengths[:2], [temp_bytes(ops.dense_routed_attention, t) for t in lengths[:2]])
    assert dense_slope > 1.8, f"the T x T reference's slope {dense_slope:.2f}"
    assert slope <= 1.15, f"blockwise attention's temp bytes grow as T^{slope:.2f}"
