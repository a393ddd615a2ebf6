"""hamjax.nn.attention: multi-head causal softmax attention (full, sliding window, RoPE, segments,
padding) against a float64 NumPy oracle that uses the layer's own weights."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hamjax import ops
from hamjax.nn.attention import Attention
from layer_checks import TOL, normal
from oracles import masked_attention_reference, rel_rms, rope_reference

B, T, D, H, K = 2, 11, 16, 3, 6  # K: head_dim
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
SEGMENT_IDS = np.array([[0] * 4 + [1] * 7, [5] * 8 + [2] * 3], np.int32)  # boundaries at 4 and 8
VALID = np.ones((B, T), bool)
VALID[0, [2, 5, 6]] = False
VALID[1, [0, 9]] = False  # row 1's first query sees no key


@functools.cache
def make_layer(window=None, rope_theta=10000.0, conv_width=None):
    return Attention(D, H, K, window=window, rope_theta=rope_theta, conv_width=conv_width, rngs=nnx.Rngs(0))


@nnx.jit
def run(layer, x, segment_ids, valid):
    """Positional arguments only, so that equal calls share one compilation. Returns y."""
    y, cache, _ = layer(x, segment_ids=segment_ids, valid=valid)
    assert cache is None
    return y


def kernels(layer):
    """The four projection kernels, and the conv's weight [W, 3HK] under "conv" when it has one."""
    params = {name: np.asarray(getattr(layer, name).kernel[...], np.float64) for name in PROJECTIONS}
    return params if layer.conv is None else {**params, "conv": np.asarray(layer.conv.weight[...], np.float64)}


def conv_oracle(x, weight, segment_ids, valid):
    """x [B, T, C], weight [W, C] float64: each valid token's output is sum_m weight[W-1-m] times
    the m-th valid token before it (m = 0: itself) in its own segment (a run of equal ids)."""
    batch, t, _ = x.shape
    runs = np.cumsum(np.diff(segment_ids, axis=1, prepend=segment_ids[:, :1] - 1) != 0, axis=1)
    y = np.zeros_like(x)
    for b in range(batch):
        for i in range(t):
            earlier = [j for j in range(i + 1) if valid[b, j] and runs[b, j] == runs[b, i]][::-1]
            y[b, i] = sum(weight[len(weight) - 1 - m] * x[b, j] for m, j in enumerate(earlier[: len(weight)]))
    return y


def attention_oracle(params, x, *, window=None, rope_theta=10000.0, conv_width=None, segment_ids=None, valid=None):
    """float64: project with `params` (the four kernels), convolve q | k | v with params["conv"]
    when conv_width is given, rotate q and k at positions 0..T-1, then a masked softmax per query
    over the keys j with t - window < j <= t, same segment, valid."""
    x = np.asarray(x, np.float64)
    batch, t, _ = x.shape
    q, k, v = (x @ params[name] for name in PROJECTIONS[:3])
    if conv_width is not None:
        ids = np.zeros((batch, t), np.int32) if segment_ids is None else np.asarray(segment_ids)
        ok = np.ones((batch, t), bool) if valid is None else np.asarray(valid, bool)
        q, k, v = np.split(conv_oracle(np.concatenate([q, k, v], axis=-1), params["conv"], ids, ok), 3, axis=-1)
    q, k, v = (np.reshape(a, (batch, t, H, K)) for a in (q, k, v))
    pos = np.arange(t)
    q, k = (rope_reference(a, pos[:, None], rope_theta) for a in (q, k))
    visible = pos[None, :] <= pos[:, None]  # [query, key]
    if window is not None:
        visible &= pos[None, :] > pos[:, None] - window
    mask = np.broadcast_to(visible, (batch, H, t, t))
    if valid is not None:
        mask = mask & np.asarray(valid, bool)[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    heads = lambda a: np.moveaxis(a, 1, 2)  # noqa: E731  [B, T, H, .] -> [B, H, T, .]
    o = masked_attention_reference(q, heads(k), heads(v), mask, np.full(H, K**-0.5))
    return o.reshape(batch, t, H * K) @ params["out_proj"]


LAYERS = {
    "full": dict(),
    "window1": dict(window=1),
    "window3": dict(window=3),
    "window_T": dict(window=T),
    "window_over_T": dict(window=T + 5),
    "no_rope": dict(rope_theta=None),
    "conv": dict(conv_width=4),
    "conv_window3": dict(window=3, conv_width=2),
}
INPUTS = {
    "plain": dict(),
    "segments": dict(segment_ids=SEGMENT_IDS),
    "padding": dict(valid=VALID),
    "segments_padding": dict(segment_ids=SEGMENT_IDS, valid=VALID),
}


@pytest.mark.parametrize("inputs", INPUTS, ids=list(INPUTS))
@pytest.mark.parametrize("config", LAYERS, ids=list(LAYERS))
def test_matches_oracle(config, inputs):
    """Outputs at valid positions equal the oracle (padded keys removed); padding stays finite."""
    layer, kwargs = make_layer(**LAYERS[config]), INPUTS[inputs]
    x = normal(1, (B, T, D))
    y = run(layer, x, kwargs.get("segment_ids"), kwargs.get("valid"))
    assert y.shape == (B, T, D) and y.dtype == jnp.float32
    assert np.isfinite(np.asarray(y)).all()
    expected = attention_oracle(kernels(layer), x, **LAYERS[config], **kwargs)
    keep = kwargs.get("valid", np.ones((B, T), bool))
    error = rel_rms(np.asarray(y)[keep], expected[keep])
    assert error <= TOL, f"relative RMS error {error:.2e}"


def test_windows_of_at_least_T_equal_full_attention():
    x = normal(2, (B, T, D))
    full = run(make_layer(), x, SEGMENT_IDS, VALID)
    for window in (T, T + 5):
        assert rel_rms(run(make_layer(window=window), x, SEGMENT_IDS, VALID), full) <= 1e-6


def test_window_one_reads_its_own_value():
    """window=1: every token attends to itself only, so y_t = out_proj(v_proj(x_t))."""
    layer, x = make_layer(window=1), normal(3, (B, T, D))
    assert rel_rms(run(layer, x, None, None), layer.out_proj(layer.v_proj(x))) <= 1e-6


def test_segments_are_runs_of_equal_ids():
    """An id that comes back after another one starts a new segment (as in GDN and HAM)."""
    layer, x = make_layer(), normal(4, (B, T, D))
    repeated = np.array([[0] * 3 + [1] * 4 + [0] * 4, [7] * 5 + [3] * 2 + [7] * 4], np.int32)
    distinct = np.array([[0] * 3 + [1] * 4 + [2] * 4, [7] * 5 + [3] * 2 + [8] * 4], np.int32)
    np.testing.assert_array_equal(run(layer, x, repeated, None), run(layer, x, distinct, None))


def test_parameters():
    layer = make_layer()
    shapes = {".".join(map(str, path)): v.shape for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
    expected = {f"{name}.kernel": (D, H * K) for name in PROJECTIONS[:3]}
    assert shapes == {**expected, "out_proj.kernel": (H * K, D)}
    shapes = {".".join(map(str, path)): v.shape for path, v in nnx.to_flat_state(nnx.state(make_layer(conv_width=4), nnx.Param))}
    assert shapes == {**expected, "out_proj.kernel": (H * K, D), "conv.weight": (4, 3 * H * K)}


def test_gradients_match_finite_differences_of_the_oracle():
    """Every parameter's gradient is finite, nonzero, and its derivative along a random direction
    equals the float64 oracle's central difference."""
    config = dict(window=3, conv_width=3)
    layer, x = make_layer(**config), normal(5, (B, T, D))
    co = normal(6, (B, T, D)) * VALID[..., None]  # outputs at padding are ignored

    @nnx.jit
    def grad(layer, x, co):
        return nnx.grad(lambda m: jnp.sum(m(x, segment_ids=SEGMENT_IDS, valid=VALID)[0] * co))(layer)

    grads = grad(layer, x, co)
    params = kernels(layer)
    oracle_loss = lambda p: np.sum(  # noqa: E731
        attention_oracle(p, x, segment_ids=SEGMENT_IDS, valid=VALID, **config) * np.asarray(co, np.float64)
    )
    rng, eps = np.random.default_rng(7), 1e-5
    for name in (*PROJECTIONS, "conv"):
        g = np.asarray(grads.conv.weight[...] if name == "conv" else getattr(grads, name).kernel[...], np.float64)
        assert np.isfinite(g).all() and np.any(g), name
        u = rng.standard_normal(g.shape)
        shifted = lambda s: oracle_loss({**params, name: params[name] + s * u})  # noqa: E731
        numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
        np.testing.assert_allclose(np.sum(g * u), numeric, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_dim=5), "head_dim"),
        (dict(window=0), "window"),
        (dict(window=-2), "window"),
        (dict(window=2.0), "window"),
        (dict(heads=0), "heads"),
        (dict(rope_theta=0.0), "rope_theta"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"d_model": D, "heads": H, "head_dim": K, **kwargs}
    with pytest.raises(ValueError, match=match):
        Attention(**args, rngs=nnx.Rngs(0))


def test_odd_head_dim_without_rope_is_fine():
    layer = Attention(D, H, 5, rope_theta=None, rngs=nnx.Rngs(0))
    assert run(layer, jnp.zeros((1, 3, D)), None, None).shape == (1, 3, D)


@pytest.mark.parametrize(
    "x_shape, kwargs, match",
    [
        ((T, D), {}, r"x must have rank 3 \[B, T, D\], got shape \(11, 16\)"),
        ((B, T, D + 1), {}, r"x must have shape.*\(2, 11, 17\)"),
        ((B, T, D), dict(segment_ids=SEGMENT_IDS[:, :-1]), r"segment_ids must have shape.*\(2, 10\)"),
        ((B, T, D), dict(segment_ids=SEGMENT_IDS.astype(np.float32)), "segment_ids must have an integer"),
        ((B, T, D), dict(valid=VALID[:1]), r"valid must have shape.*\(1, 11\)"),
    ],
    ids=["x_rank", "x_width", "segment_ids_shape", "segment_ids_dtype", "valid_shape"],
)
def test_bad_inputs_raise(x_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_layer()(jnp.zeros(x_shape), **kwargs)


def test_attend_rejects_bad_window():
    q = jnp.zeros((1, 2, 1, 4))
    kv = jnp.zeros((1, 1, 2, 4))
    with pytest.raises(ValueError, match="window"):
        ops.attend(q, jnp.zeros((1, 2), jnp.int32), kv, kv, jnp.zeros((1, 1, 2), jnp.int32),
                   jnp.ones((1, 1, 2), bool), logit_scale=jnp.ones(1), window=0)


# --- the decode cache --------------------------------------------------------------------------


@nnx.jit
def run_cached(layer, x, cache, valid):
    return layer(x, cache=cache, valid=valid)[:2]


CACHE_LAYERS = {"full": {}, "window 3": dict(window=3), "window 1": dict(window=1), "conv": dict(conv_width=4),
                "window 3 conv": dict(window=3, conv_width=3)}


@pytest.mark.parametrize("config", CACHE_LAYERS.values(), ids=list(CACHE_LAYERS))
def test_prefix_then_suffix_and_token_steps_equal_one_pass(config):
    """One pass over T tokens == a prefix into the cache, then the suffix; == T single-token calls
    (the window's slots wrap around several times), with padding in both."""
    layer, x = make_layer(**config), normal(8, (B, T, D))
    valid = np.ones((B, T), bool)
    valid[0, [1, 6]] = False
    full = np.where(valid[..., None], run(layer, x, None, valid), 0)
    split = 5
    cache = layer.init_cache(B, max_len=T)
    y1, cache = run_cached(layer, x[:, :split], cache, valid[:, :split])
    y2, cache = run_cached(layer, x[:, split:], cache, valid[:, split:])
    np.testing.assert_array_equal(cache.position, [T, T])
    both = np.where(valid[..., None], np.concatenate([y1, y2], axis=1), 0)
    assert rel_rms(both, full) <= TOL
    cache, steps = layer.init_cache(B, max_len=T), []
    for t in range(T):
        y, cache = run_cached(layer, x[:, t : t + 1], cache, valid[:, t : t + 1])
        steps.append(y)
    stepped = np.where(valid[..., None], np.concatenate(steps, axis=1), 0)
    assert rel_rms(stepped, full) <= TOL


def test_window_cache_holds_the_last_window_positions():
    layer = make_layer(window=3)
    cache = layer.init_cache(1, max_len=100)
    assert cache.keys.shape == (1, H, 3, K)
    _, cache = run_cached(layer, normal(9, (1, 7, D)), cache, np.ones((1, 7), bool))
    np.testing.assert_array_equal(np.sort(np.asarray(cache.positions[0, 0])), [4, 5, 6])


def test_cache_with_segment_ids_is_refused():
    layer = make_layer()
    with pytest.raises(ValueError, match="segment_ids"):
        layer(jnp.zeros((B, T, D)), cache=layer.init_cache(B, max_len=T), segment_ids=SEGMENT_IDS)
