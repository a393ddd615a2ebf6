"""hamjax.ops.attention and hamjax.ops.rope: routed causal attention over original positions (masks,
segments, learned-router log weights; dense == compacted) and RoPE, against float64 NumPy oracles
(DESIGN.md §1.1 step 7, §1.3)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hamjax import ops
from hamjax.ops import blockwise_attention
from hamjax.ops import kv_cache as kv
from hamjax.ops.segments import segment_index
from oracles import assert_close, masked_attention_reference, rope_reference, unit

TOL = 1e-5  # relative RMS error allowed for float32 against the float64 oracle
B, T, H, K, V = 2, 23, 3, 6, 5


# ------------------------------------------------------------------------------------------ attend


def attend_case(seed, slots=17, segments=False, log_weights=False, logit_scale=(3.0, 8.0, 20.0)):
    """Random queries at positions 10..32 and `slots` keys at random positions 0..40 (some after every
    query, so causality matters), about 70% valid; optional segment ids and log weights."""
    rng = np.random.default_rng(seed)
    args = dict(
        q=unit(rng.standard_normal((B, T, H, K))),
        q_positions=np.broadcast_to(10 + np.arange(T, dtype=np.int32), (B, T)),
        keys=unit(rng.standard_normal((B, H, slots, K))),
        values=rng.standard_normal((B, H, slots, V)).astype(np.float32),
        key_positions=rng.integers(0, 41, (B, H, slots)).astype(np.int32),
        key_valid=rng.random((B, H, slots)) < 0.7,
    )
    # One (row, head) with no valid key: its queries must read 0.
    args["key_valid"][1, 2] = False
    kwargs = dict(logit_scale=np.asarray(logit_scale, np.float32))
    if segments:
        kwargs["q_segments"] = (np.arange(T)[None, :] >= np.array([[8], [15]])).astype(np.int32)
        kwargs["key_segments"] = rng.integers(0, 2, (B, H, slots)).astype(np.int32)
    if log_weights:
        kwargs["key_log_weights"] = np.log(rng.uniform(0.05, 1.0, (B, H, slots))).astype(np.float32)
    return args, kwargs


def attend_mask(args, kwargs):
    """[B, H, T, S]: valid key, key position <= query position, same segment (if given)."""
    mask = args["key_valid"][:, :, None, :] & (
        args["key_positions"][:, :, None, :] <= args["q_positions"][:, None, :, None])
    if "q_segments" in kwargs:
        mask &= kwargs["key_segments"][:, :, None, :] == kwargs["q_segments"][:, None, :, None]
    return mask


_attend = jax.jit(ops.attend)


@pytest.mark.parametrize("log_weights", [False, True], ids=["no_weights", "log_weights"])
@pytest.mark.parametrize("segments", [False, True], ids=["no_segments", "segments"])
def test_attend_matches_masked_softmax_oracle(segments, log_weights):
    args, kwargs = attend_case(0, segments=segments, log_weights=log_weights)
    out = _attend(*args.values(), **kwargs)
    chex.assert_shape(out, (B, T, H, V))
    chex.assert_type(out, jnp.float32)
    mask = attend_mask(args, kwargs)
    expected = masked_attention_reference(args["q"], args["keys"], args["values"], mask,
                                          kwargs["logit_scale"], kwargs.get("key_log_weights"))
    assert_close(out, expected, "attend")
    # The case covers queries that see no key: they read exactly 0 (and the mask is not trivial).
    blind = ~mask.any(-1)  # [B, H, T]
    assert blind.any() and not blind.all()
    np.testing.assert_array_equal(np.moveaxis(np.asarray(out), 2, 1)[blind], 0.0)
    assert (~mask & args["key_valid"][:, :, None, :]).any(), "causality never masks a valid key"


def test_attend_is_stable_for_large_logit_scales():
    """logit_scale 1e4 (logits up to 1e4): no overflow, still the oracle's (near one-hot) softmax."""
    args, kwargs = attend_case(1, logit_scale=(1e4, 1e3, 1.0))
    out = _attend(*args.values(), **kwargs)
    expected = masked_attention_reference(args["q"], args["keys"], args["values"], attend_mask(args, kwargs),
                                          kwargs["logit_scale"])
    assert_close(out, expected, "attend, large logit scale", tol=1e-4)


@pytest.mark.parametrize("log_weights", [False, True], ids=["no_weights", "log_weights"])
def test_attend_gradients_are_finite_with_blind_queries(log_weights):
    """Queries with no visible key (output 0 through a -inf mask) must not put NaN in any gradient."""
    args, kwargs = attend_case(2, log_weights=log_weights)
    names = ["q", "keys", "values"] + (["key_log_weights"] if log_weights else [])
    co = np.random.default_rng(3).standard_normal((B, T, H, V)).astype(np.float32)

    def loss(*xs):
        merged = {**args, **kwargs, **dict(zip(names, xs))}
        return jnp.sum(ops.attend(**merged) * co)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*({**args, **kwargs}[n] for n in names))
    for name, grad in zip(names, grads):
        assert np.isfinite(np.asarray(grad)).all(), f"d/d{name} has non-finite values"


@pytest.mark.parametrize("window", [1, 4, 41])
@pytest.mark.parametrize("segments", [False, True], ids=["no_segments", "segments"])
def test_attend_window_matches_brute_force_mask(window, segments):
    """window: key j is seen by query t only if pos_t - window < pos_j <= pos_t (and valid, same
    segment); a window spanning every position (41 here) changes nothing."""
    args, kwargs = attend_case(7, segments=segments)
    out = jax.jit(ops.attend, static_argnames="window")(*args.values(), **kwargs, window=window)
    mask = np.zeros((B, H, T, args["keys"].shape[2]), bool)
    for b, h, t, j in np.ndindex(mask.shape):
        q_pos, key_pos = args["q_positions"][b, t], args["key_positions"][b, h, j]
        same = not segments or kwargs["key_segments"][b, h, j] == kwargs["q_segments"][b, t]
        mask[b, h, t, j] = args["key_valid"][b, h, j] and q_pos - window < key_pos <= q_pos and same
    expected = masked_attention_reference(args["q"], args["keys"], args["values"], mask, kwargs["logit_scale"])
    assert_close(out, expected, f"attend, window={window}")
    if window < 41:
        assert (attend_mask(args, kwargs) & ~mask).any(), "the window never hides a key"
    else:
        assert_close(out, np.asarray(_attend(*args.values(), **kwargs)), "window 41", tol=1e-6)


# ---------------------------------------------------------------------- dense == compacted routing


def routed_case(seed):
    """A sequence of tokens with positions 5..27, about a third admitted per head, segment ids and
    learned-router log weights."""
    rng = np.random.default_rng(seed)
    return dict(
        q=unit(rng.standard_normal((B, T, H, K))),
        k=unit(rng.standard_normal((B, T, H, K))),
        v=rng.standard_normal((B, T, H, V)).astype(np.float32),
        admitted=rng.random((B, T, H)) < 0.35,
        positions=np.broadcast_to(5 + np.arange(T, dtype=np.int32), (B, T)),
        segment_ids=np.stack([np.repeat([3, 1, 3], [7, 9, 7]), np.repeat([0, 2], [12, 11])]).astype(np.int32),
        log_weights=np.log(rng.uniform(0.05, 1.0, (B, T, H))).astype(np.float32),
    )


LOGIT_SCALE = np.array([2.0, 6.0, 12.0], np.float32)


@pytest.mark.parametrize("log_weights", [False, True], ids=["no_weights", "log_weights"])
@pytest.mark.parametrize("segments", [False, True], ids=["no_segments", "segments"])
def test_dense_routed_attention_matches_oracle_and_compacted_buffer(segments, log_weights):
    """dense_routed_attention == the oracle (causal & admitted & same segment); and attending to a
    compacted buffer holding only the admitted tokens (kv_cache.append_tokens) gives the same."""
    x = routed_case(4)
    seg = x["segment_ids"] if segments else None
    lw = x["log_weights"] if log_weights else None
    dense = jax.jit(functools.partial(ops.dense_routed_attention, logit_scale=LOGIT_SCALE))(
        x["q"], x["k"], x["v"], x["admitted"], x["positions"], segment_ids=seg, log_weights=lw)
    to_heads = lambda a: np.moveaxis(a, 1, 2)  # noqa: E731
    mask = (to_heads(x["admitted"])[:, :, None, :]
            & (np.arange(T)[None, :] <= np.arange(T)[:, None])[None, None])
    if segments:
        mask &= (seg[:, None, :, None] == seg[:, None, None, :])
    expected = masked_attention_reference(x["q"], to_heads(x["k"]), to_heads(x["v"]), mask, LOGIT_SCALE,
                                          None if lw is None else to_heads(lw))
    assert_close(dense, expected, "dense_routed_attention")

    capacity = int(x["admitted"].sum(1).max())
    buffer = kv.append_tokens(ops.init_kv_cache(B, H, capacity, K, V), x["k"], x["v"], x["positions"],
                              np.exp(x["log_weights"]), x["admitted"])
    key_segments = None
    if segments:  # look each buffered key's segment up by its position
        offset = np.clip(np.asarray(buffer.positions) - 5, 0, T - 1)
        key_segments = np.take_along_axis(seg[:, None, :].repeat(H, 1), offset, axis=2)
    compacted = _attend(x["q"], x["positions"], buffer.keys, buffer.values, buffer.positions, buffer.occupied,
                        logit_scale=LOGIT_SCALE, q_segments=seg, key_segments=key_segments,
                        key_log_weights=jnp.log(buffer.scores) if log_weights else None)
    assert_close(compacted, dense, "compacted vs dense", tol=1e-6)


@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window5"])
@pytest.mark.parametrize("with_cache", [False, True], ids=["no_cache", "cache"])
def test_dense_routed_attention_blockwise_equals_one_block(with_cache, window, monkeypatch):
    """blockwise=True (ops.blockwise_attend, as the attention layers call it) gives the one-block
    result and gradients, with segments, learned-router weights, a window and a cache's entries,
    in blocks of 4 queries and 3 keys (blocks that straddle segments and the cache's end)."""
    monkeypatch.setattr(blockwise_attention, "QUERY_BLOCK", 4)
    monkeypatch.setattr(blockwise_attention, "KEY_BLOCK", 3)
    x = routed_case(5)
    cotangent = np.random.default_rng(6).standard_normal((B, T, H, V)).astype(np.float32)
    cache = None
    if with_cache:  # entries at positions 0..4, before the sequence's first token (5)
        rng = np.random.default_rng(7)
        cache = kv.append_tokens(ops.init_kv_cache(B, H, 6, K, V), unit(rng.standard_normal((B, 5, H, K))),
                                 rng.standard_normal((B, 5, H, V)).astype(np.float32), np.arange(5)[None],
                                 rng.uniform(0.1, 1.0, (B, 5, H)), rng.random((B, 5, H)) < 0.6)
    segments = np.asarray(segment_index(x["segment_ids"]))

    def output_and_grads(blockwise):
        def attention(q, k, v, log_weights):
            return ops.dense_routed_attention(q, k, v, x["admitted"], x["positions"], logit_scale=LOGIT_SCALE,
                                              segment_ids=segments, log_weights=log_weights, cache=cache,
                                              window=window, blockwise=blockwise)

        out, vjp = jax.vjp(jax.jit(attention), x["q"], x["k"], x["v"], x["log_weights"])
        return out, vjp(cotangent)

    (out, grads), (one_out, one_grads) = output_and_grads(True), output_and_grads(False)
    assert_close(out, np.asarray(one_out, np.float64), "output, blockwise", tol=1e-6)
    for name, got, want in zip(("q", "k", "v", "log_weights"), grads, one_grads):
        assert_close(got, np.asarray(want, np.float64), f"d/d{name}, blockwise", tol=1e-6)


# -------------------------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_matches_oracle(theta):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((B, T, H, 8)).astype(np.float32)
    positions = rng.integers(0, 5000, (B, T)).astype(np.int32)
    out = jax.jit(ops.apply_rope, static_argnums=2)(x, positions, theta)
    chex.assert_type(out, jnp.float32)
    # Angles up to 5000 rad: float32 rounding of position * freq gives ~5000 * 2^-24 ~ 3e-4 rad.
    assert_close(out, rope_reference(x, positions[..., None], theta), f"rope theta={theta}", tol=1e-4)
    small = positions % 64  # angles below 64 rad
    assert_close(jax.jit(ops.apply_rope, static_argnums=2)(x, small, theta),
                 rope_reference(x, small[..., None], theta), f"rope theta={theta}, positions < 64")


def test_rope_with_positions_shared_by_all_rows():
    """positions [1, T] rotate every row as [B, T] positions repeated per row would, bit for bit."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((B, T, H, 8)).astype(np.float32)
    shared = rng.integers(0, 300, (1, T)).astype(np.int32)
    rope = jax.jit(ops.apply_rope)
    np.testing.assert_array_equal(rope(x, shared), rope(x, np.repeat(shared, B, axis=0)))
    assert_close(rope(x, shared), rope_reference(x, np.repeat(shared, B, axis=0)[..., None], 10000.0), "shared")


def test_rope_properties():
    """Position 0 is the identity; norms are kept; q . k depends only on the position difference;
    the dtype is kept."""
    rng = np.random.default_rng(6)
    q, k = (rng.standard_normal((1, T, H, 8)).astype(np.float32) for _ in range(2))
    rope = jax.jit(ops.apply_rope)
    zeros = np.zeros((1, T), np.int32)
    np.testing.assert_allclose(rope(q, zeros), q, rtol=0, atol=0)
    pos = rng.integers(0, 100, (1, T)).astype(np.int32)
    np.testing.assert_allclose(np.linalg.norm(rope(q, pos), axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
    dots = [np.sum(np.asarray(rope(q, pos + shift)) * np.asarray(rope(k, pos[:, ::-1] + shift)), -1)
            for shift in (0, 37)]
    np.testing.assert_allclose(dots[1], dots[0], rtol=1e-4, atol=1e-5)
    assert rope(q.astype(jnp.bfloat16), pos).dtype == jnp.bfloat16


@pytest.mark.parametrize("dim", [5, 7])
def test_rope_odd_head_dim_raises(dim):
    x = np.zeros((1, 3, 2, dim), np.float32)
    with pytest.raises(ValueError, match=rf"even head dimension.*\(1, 3, 2, {dim}\)"):
        ops.apply_rope(x, np.zeros((1, 3), np.int32))


def test_attend_with_no_key_slots_reads_zero():
    """A cache of capacity 0: nothing to attend to, output 0 (no reduction over an empty axis)."""
    q = jnp.ones((2, 3, 2, 4), jnp.float32)
    out = ops.attend(q, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 2, 0, 4)), jnp.zeros((2, 2, 0, 5)),
                     jnp.zeros((2, 2, 0), jnp.int32), jnp.zeros((2, 2, 0), bool), logit_scale=jnp.ones(2))
    chex.assert_shape(out, (2, 3, 2, 5))
    assert not np.asarray(out).any()
