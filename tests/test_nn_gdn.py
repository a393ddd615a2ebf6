"""hamjax.nn.gdn: the Gated DeltaNet layer (parallel form == decode steps, caches, padding, segments)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hamjax.nn import GatedDeltaNet, GDNCache, NoWeightDecay
from layer_checks import assert_tree_close, call, call_steps, normal

B, T, D, H, K, V, W = 2, 20, 16, 2, 8, 6, 4
SPLIT = 7  # prefix length; the suffix has T - SPLIT = 13 tokens


@pytest.fixture(scope="module")
def layer():
    return GatedDeltaNet(D, H, K, V, conv_width=W, chunk_size=8, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def x():
    return normal(1, (B, T, D))


def random_cache(layer, seed=2):
    """A nonzero cache, as a previous call would leave."""
    empty = layer.init_cache(B, T)
    rnn, conv = normal(seed, empty.rnn.shape, empty.conv.shape)
    return GDNCache(0.3 * rnn, conv)


def segment_layout(a=SPLIT, b=T - SPLIT):
    """Row 0: a segment of a tokens then one of b; row 1: b then a. Returns segment_ids [B, T]."""
    return jnp.array([[3] * a + [4] * b, [0] * b + [9] * a])


def test_initialisation_ranges():
    layer = GatedDeltaNet(4, 256, 2, 2, rngs=nnx.Rngs(0))
    a = np.exp(np.asarray(layer.proj.A_log[...]))
    dt = np.asarray(jax.nn.softplus(layer.proj.dt_bias[...]))
    assert np.all((a > 0) & (a <= 16)) and a.min() < 1 and a.max() > 15  # A ~ U(0, 16]
    np.testing.assert_allclose([dt.min(), dt.max()], [1e-3, 1e-1], rtol=0.2)  # dt ~ logU(1e-3, 1e-1)
    assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5)))
    assert abs(np.mean(np.log10(dt)) + 2) < 0.2  # log-uniform: mean log10 dt = -2


def test_no_weight_decay_parameters(layer):
    paths = lambda f: {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(layer, f))}
    assert paths(NoWeightDecay) == {"proj.A_log", "proj.dt_bias", "norm.scale"}
    assert paths(nnx.Param) >= paths(NoWeightDecay)  # optimizers with wrt=nnx.Param train them


def test_parameter_count(layer):
    qkv = H * (2 * K + V)
    expected = D * qkv + W * qkv + D * H * (V + 2) + 2 * H + V + H * V * D
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(layer, nnx.Param))) == expected


def test_cache_is_typed(layer):
    cache = layer.init_cache(B, T)
    assert isinstance(cache, GDNCache)
    assert cache.rnn.shape == (B, H, K, V) and cache.rnn.dtype == jnp.float32
    assert cache.conv.shape == (B, W - 1, H * (2 * K + V))
    assert not np.any(cache.rnn) and not np.any(cache.conv)


@pytest.mark.parametrize("method", ["chunk", "recurrent"])
def test_sequence_equals_step_loop(layer, x, method):
    cache = random_cache(layer)
    y, end, _ = call(layer, x, cache, method=method)
    y_steps, end_steps, _ = call_steps(layer, x, cache)
    assert_tree_close((y, end), (y_steps, end_steps))


def test_prefix_cache_suffix_equals_one_pass(layer, x):
    cache = random_cache(layer)
    y_prefix, mid, _ = call(layer, x[:, :SPLIT], cache)
    y_suffix, end, _ = call(layer, x[:, SPLIT:], mid)
    assert_tree_close((jnp.concatenate([y_prefix, y_suffix], axis=1), end), call(layer, x, cache)[:2])


def test_padding_leaves_state_unchanged(layer, x):
    """Padding anywhere is invisible: the valid tokens' outputs and the final cache equal a run
    without the padding."""
    cache = random_cache(layer)
    n = T - SPLIT
    valid = np.ones((B, T), bool)
    valid[0, [0, 5, 6, 7, 12, 18, 19]] = False
    valid[1, :7] = False
    slots = [np.flatnonzero(row) for row in valid]
    x_valid = x[:, :n]
    x_padded = jnp.stack([(x[r] * 5.0).at[s].set(x_valid[r]) for r, s in enumerate(slots)])
    y, end, _ = call(layer, x_padded, cache, valid=jnp.asarray(valid))
    y_valid, expected_end, _ = call(layer, x_valid, cache)
    assert_tree_close(jnp.stack([y[r, s] for r, s in enumerate(slots)]), y_valid)
    assert_tree_close(end, expected_end)
    _, step_end, _ = call(layer, x[:, :1], cache, valid=jnp.zeros((B, 1), bool))
    assert_tree_close(step_end, cache)


def test_segments_reset_state_and_conv(layer, x):
    """One pass over packed rows == each segment run on its own (the first from the incoming cache)."""
    cache = random_cache(layer)
    y, end, _ = call(layer, x, cache, segment_ids=segment_layout())
    rows = lambda tree, r: jax.tree.map(lambda a: a[r : r + 1], tree)
    # Segments of SPLIT tokens: row 0's first (from the cache), row 1's last (from zeros); likewise
    # for the long segments. Batch them so that each shape compiles once.
    short_cache = jax.tree.map(lambda a: a.at[1].set(0.0), cache)
    long_cache = jax.tree.map(lambda a: a.at[0].set(0.0), cache)
    x_short = jnp.stack([x[0, :SPLIT], x[1, T - SPLIT :]])
    x_long = jnp.stack([x[0, SPLIT:], x[1, : T - SPLIT]])
    y_short, end_short, _ = call(layer, x_short, short_cache)
    y_long, end_long, _ = call(layer, x_long, long_cache)
    assert_tree_close(y[0], jnp.concatenate([y_short[0], y_long[0]]))
    assert_tree_close(y[1], jnp.concatenate([y_long[1], y_short[1]]))
    assert_tree_close(rows(end, 0), rows(end_long, 0))
    assert_tree_close(rows(end, 1), rows(end_short, 1))


def test_bad_input_width_raises(layer):
    with pytest.raises(ValueError, match=r"x must have shape.*\(2, 5, 17\)"):
        layer(jnp.zeros((B, 5, D + 1)))
    with pytest.raises(ValueError, match="valid"):
        layer(jnp.zeros((B, 5, D)), valid=jnp.ones((B, 4), bool))
