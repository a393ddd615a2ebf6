"""Short causal depthwise convolution with an explicit decode state.

Each output channel is sum_i weight[i] * x[t - (width - 1) + i]: tap width - 1 is the current token.
The state holds the last width - 1 inputs; decoding passes it in and gets the next one back.
Padding tokens (valid=False) are skipped: every valid token convolves over the valid tokens before it,
and the state holds the last width - 1 valid inputs. A new segment (segment_ids) starts from zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hamjax.ops import validation
from hamjax.ops.segments import segment_index


def causal_conv(x, weight, state, *, segment_ids=None, valid=None):
    """x [B, T, C]; weight [W, C]; state [B, W-1, C] (the inputs before token 0); segment_ids [B, T];
    valid [B, T]. Returns (y [B, T, C] (0 at padding), new state [B, W-1, C]).

    Token 0 continues `state`; where segment_ids changes the window restarts from zeros, and the new
    state holds only inputs of the last token's segment (zeros if that segment has no valid token yet).
    """
    width = weight.shape[0]
    batch, t, _ = x.shape
    segment = (
        jnp.zeros((batch, t), jnp.int32)
        if segment_ids is None
        else segment_index(segment_ids)
    )
    last_segment = segment[:, -1:]
    if valid is None:
        count = jnp.full((batch, 1), t)
    else:
        valid = jnp.asarray(valid, bool)
        rank = jnp.cumsum(valid, axis=1) - 1  # index of each valid token among the valid ones
        x, segment = _compact(x, rank, valid), _compact(segment, rank, valid)
        count = rank[:, -1:] + 1
    inputs = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, W-1+T, C]
    segments = jnp.concatenate([jnp.zeros((batch, width - 1), jnp.int32), segment], axis=1)
    keep = jnp.stack([segments[:, i : i + t] == segment for i in range(width)])  # [W, B, T]
    y = masked_taps(inputs, weight, keep)
    if valid is not None:
        y = jnp.where(valid[..., None], jnp.take_along_axis(y, jnp.maximum(rank, 0)[..., None], axis=1), 0.0)
    tail = count + jnp.arange(width - 1)  # the last W-1 inputs up to the last valid token
    new_state = jnp.take_along_axis(inputs, tail[..., None], axis=1)
    same = jnp.take_along_axis(segments, tail, axis=1) == last_segment
    return y, jnp.where(same[..., None], new_state, 0.0)


@jax.custom_jvp
def masked_taps(inputs, weight, keep):
    """sum_i weight[i] * inputs[:, i : i + T] where keep[i], summed in float32: the convolution's core.

    inputs [B, T+W-1, C] (any float dtype); weight [W, C]; keep [W, B, T] bool. Returns [B, T, C]
    float32. Bilinear in (inputs, weight), so its derivative is itself: a custom_jvp (forward mode
    works; reverse mode transposes it) whose tangent is recomputed in the backward pass, so that
    only the inputs, in their own dtype, are kept for it (not W masked float32 copies).
    """
    t = keep.shape[-1]
    f32 = jnp.float32
    return sum(
        weight[i].astype(f32) * jnp.where(keep[i][..., None], inputs[:, i : i + t].astype(f32), 0.0)
        for i in range(weight.shape[0])
    )


@masked_taps.defjvp
def _masked_taps_jvp(primals, tangents):
    inputs, weight, keep = primals
    d_inputs, d_weight, _ = tangents
    return masked_taps(inputs, weight, keep), _masked_taps_tangent(inputs, weight, keep, d_inputs, d_weight)


@jax.checkpoint
def _masked_taps_tangent(inputs, weight, keep, d_inputs, d_weight):
    return masked_taps(d_inputs, weight, keep) + masked_taps(inputs, d_weight, keep)


def causal_conv_step(x, weight, state, *, valid=None):
    """One token: x [B, C]; weight [W, C]; state [B, W-1, C]; valid [B] (False: y = 0, state unchanged).

    Returns (y [B, C], new state [B, W-1, C]).
    """
    window = jnp.concatenate([state.astype(x.dtype), x[:, None]], axis=1)  # [B, W, C]
    y = sum(weight[i] * window[:, i] for i in range(weight.shape[0]))
    if valid is None:
        return y, window[:, 1:]
    valid = jnp.asarray(valid, bool)
    return jnp.where(valid[:, None], y, 0.0), jnp.where(valid[:, None, None], window[:, 1:], state)


def _compact(x, rank, valid):
    """Move each row's valid entries (x [B, T, ...]) to the front, in order; zeros after them."""
    batch, t = valid.shape
    slot = jnp.where(valid, rank, t)  # padding goes out of range and is dropped
    return jnp.zeros_like(x).at[jnp.arange(batch)[:, None], slot].set(x, mode="drop")


class ShortConv(nnx.Module):
    """Depthwise causal convolution over [B, T, C] (no bias), weight [W, C] ~ U(+-1/sqrt(W)) as in
    PyTorch's Conv1d. A length-1 input takes the single-step path."""

    def __init__(self, channels: int, width: int = 4, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        validation.check_positive_int("channels", channels)
        validation.check_positive_int("width", width)
        self.channels = channels
        self.width = width
        bound = width**-0.5
        self.weight = nnx.Param(
            jax.random.uniform(rngs.params(), (width, channels), param_dtype, -bound, bound)
        )

    def init_state(self, batch: int) -> jax.Array:
        """Zeros [B, W-1, C]: no token seen yet."""
        return jnp.zeros((batch, self.width - 1, self.channels), jnp.float32)

    def __call__(self, x, state, *, segment_ids=None, valid=None):
        """x [B, T, C]; state [B, W-1, C]; segment_ids, valid [B, T]. Returns (y [B, T, C] in x's
        dtype, new state in the state's dtype). The taps are summed in float32 whatever x's dtype."""
        validation.check_shape("conv state", state, (x.shape[0], self.width - 1, self.channels), "[B, W-1, C]")
        weight = self.weight[...].astype(jnp.float32)
        if x.shape[1] == 1:
            y, new_state = causal_conv_step(x[:, 0], weight, state, valid=None if valid is None else valid[:, 0])
            y = y[:, None]
        else:
            y, new_state = causal_conv(x, weight, state, segment_ids=segment_ids, valid=valid)
        return y.astype(x.dtype), new_state.astype(state.dtype)
