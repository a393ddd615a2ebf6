"""hamjax.nn.conv: the short causal depthwise convolution and its decode state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hamjax import nn
from hamjax.nn import ShortConv
from layer_checks import assert_tree_close, normal

B, T, C = 2, 9, 5
causal_conv = jax.jit(nn.causal_conv)
causal_conv_step = jax.jit(nn.causal_conv_step)


def inputs(width, seed=0):
    """(x [B, T, C], weight [W, C], nonzero state [B, W-1, C])."""
    return tuple(normal(seed, (B, T, C), (width, C), (B, width - 1, C)))


def step_loop(x, weight, state):
    ys = []
    for t in range(x.shape[1]):
        y, state = causal_conv_step(x[:, t], weight, state)
        ys.append(y)
    return jnp.stack(ys, axis=1), state


def direct(x, weight, state):
    """The definition: y_t = sum_i w_i * [state, x]_{t + i}, in float64."""
    width = weight.shape[0]
    padded = np.concatenate([np.asarray(state, np.float64), np.asarray(x, np.float64)], axis=1)
    return sum(np.asarray(weight[i], np.float64) * padded[:, i : i + x.shape[1]] for i in range(width))


@pytest.mark.parametrize("width", [1, 2, 4])
def test_sequence_equals_step_loop_and_definition(width):
    x, weight, state = inputs(width)
    y, new_state = causal_conv(x, weight, state)
    assert_tree_close((y, new_state), step_loop(x, weight, state))
    assert_tree_close(y, direct(x, weight, state))
    np.testing.assert_array_equal(new_state, x[:, T - width + 1 :])


@pytest.mark.parametrize("split", [1, 2, 6])
def test_prefix_state_suffix_equals_one_pass(split):
    x, weight, state = inputs(4)
    y_prefix, mid = causal_conv(x[:, :split], weight, state)
    y_suffix, end = causal_conv(x[:, split:], weight, mid)
    assert_tree_close((jnp.concatenate([y_prefix, y_suffix], axis=1), end), causal_conv(x, weight, state))


def test_segment_boundaries_block_mixing():
    """One pass with segment ids == each segment run on its own (the first from the incoming state,
    the others from zeros); the new state is the last segment's, zero-filled when it is short."""
    x, weight, state = inputs(4)
    ids = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 7]])
    y, new_state = causal_conv(x, weight, state, segment_ids=ids)
    for row in range(B):
        bounds = [0] + [t for t in range(1, T) if ids[row, t] != ids[row, t - 1]] + [T]
        row_state = state[row : row + 1]
        for n, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg_state = row_state if n == 0 else jnp.zeros_like(row_state)
            y_seg, seg_end = causal_conv(x[row : row + 1, start:stop], weight, seg_state)
            assert_tree_close(y[row : row + 1, start:stop], y_seg)
        assert_tree_close(new_state[row : row + 1], seg_end)
    np.testing.assert_array_equal(new_state[1, :2], 0.0)  # last segment holds a single token


def test_padding_is_skipped():
    """Padding anywhere: the valid tokens convolve as if the padding were absent, padding outputs 0,
    and the state holds the last valid inputs."""
    x, weight, state = inputs(4)
    valid = jnp.array([[1, 0, 1, 1, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 0]], bool)
    n = 6
    x_valid = x[:, :n]
    slots = [np.flatnonzero(row) for row in np.asarray(valid)]
    x_padded = jnp.stack([jnp.full((T, C), 7.0).at[s].set(x_valid[r]) for r, s in enumerate(slots)])
    y, new_state = causal_conv(x_padded, weight, state, valid=valid)
    y_valid, expected_state = causal_conv(x_valid, weight, state)
    assert_tree_close(jnp.stack([y[r, s] for r, s in enumerate(slots)]), y_valid)
    np.testing.assert_array_equal(jnp.where(valid[..., None], 0.0, y), 0.0)
    assert_tree_close(new_state, expected_state)


def test_padding_step_leaves_state_unchanged():
    x, weight, state = inputs(4)
    y, new_state = causal_conv_step(x[:, 0], weight, state, valid=jnp.array([False, True]))
    np.testing.assert_array_equal(new_state[0], state[0])
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_array_equal(new_state[1], jnp.concatenate([state[1, 1:], x[1, :1]]))


def test_state_belongs_to_last_segment_even_when_it_is_padding():
    """As for the delta rule's state: trailing padding that starts a new segment empties the state."""
    x, weight, state = inputs(4)
    ids = jnp.array([[0] * 8 + [1]] * B)
    valid = jnp.array([[True] * 8 + [False]] * B)
    _, new_state = causal_conv(x, weight, state, segment_ids=ids, valid=valid)
    np.testing.assert_array_equal(new_state, 0.0)


def test_module_length_one_takes_step_path_and_matches_sequence():
    conv = ShortConv(C, 4, rngs=nnx.Rngs(0))
    x, _, state = inputs(4)
    weight = conv.weight[...]
    assert weight.shape == (4, C) and np.all(np.abs(weight) <= 0.5)  # U(+-1/sqrt(W))
    np.testing.assert_array_equal(conv.init_state(B), np.zeros((B, 3, C)))
    y, new_state = conv(x[:, :1], state)
    assert_tree_close((y, new_state), causal_conv(x[:, :1], weight, state))
    assert_tree_close((y[:, 0], new_state), causal_conv_step(x[:, 0], weight, state))
    assert_tree_close(conv(x, state), causal_conv(x, weight, state))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="width.*0"):
        ShortConv(C, 0, rngs=nnx.Rngs(0))
    conv = ShortConv(C, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="conv state"):
        conv(jnp.zeros((B, T, C)), jnp.zeros((B, 2, C)))


def plain_taps(inputs, weight, keep):
    """masked_taps' forward formula, differentiated automatically."""
    t = keep.shape[-1]
    return sum(weight[i] * jnp.where(keep[i][..., None], inputs[:, i : i + t], 0.0) for i in range(weight.shape[0]))


@pytest.mark.parametrize("width", [1, 2, 4])
def test_masked_taps_backward_equals_automatic(width):
    """The written-out backward of the convolution's core == automatic differentiation of its forward,
    with a random mask."""
    inputs_, weight, cotangent = normal(3, (B, T + width - 1, C), (width, C), (B, T, C))
    keep = jnp.asarray(np.random.default_rng(4).random((width, B, T)) > 0.3)
    grads = [
        jax.jit(jax.grad(lambda a, w: jnp.sum(f(a, w, keep) * cotangent), argnums=(0, 1)))(inputs_, weight)
        for f in (nn.conv.masked_taps, plain_taps)
    ]
    assert_tree_close(*grads)


def test_gradients_equal_the_step_loop():
    """d/d(x, weight, state) of a loss on the outputs and the new state, with padding: the sequence
    form == the token-by-token loop."""
    x, weight, state = inputs(4, seed=5)
    c_y, c_state = normal(6, (B, T, C), (B, 3, C))
    valid = jnp.array([[1, 0, 1, 1, 0, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1, 1, 1, 1]], bool)

    def loop(x, weight, state):
        ys = []
        for t in range(T):
            y, state = nn.causal_conv_step(x[:, t], weight, state, valid=valid[:, t])
            ys.append(y)
        return jnp.stack(ys, axis=1), state

    def loss(f):
        return lambda x, w, s: sum(jnp.sum(a * c) for a, c in zip(f(x, w, s), (c_y, c_state)))

    sequence = lambda x, w, s: nn.causal_conv(x, w, s, valid=valid)  # noqa: E731
    grads = [jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(x, weight, state) for f in (sequence, loop)]
    assert_tree_close(*grads)
