"""RMSNorm over the last axis, computed in float32."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from hamjax.nn.variables import NoWeightDecay


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis (size `dim`; a head's V channels, one
    scale shared by all heads as in fla's FusedRMSNormGated). RMSNorm(0) = 0. Computed in float32
    (the mean of squares, the scale), returned in x's dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-5):
        self.eps = eps
        self.scale = NoWeightDecay(jnp.ones((dim,), jnp.float32))

    def __call__(self, x):
        return rms_normalize(x, self.scale[...], self.eps)


@functools.partial(jax.checkpoint, static_argnums=(2,))
def rms_normalize(x, scale, eps: float):
    """x [..., N] * scale [N] / sqrt(mean(x^2) + eps), computed in float32 and returned in x's dtype.
    Recomputed in the backward pass (jax.checkpoint), so only x is kept for it, in its own dtype."""
    x32 = jnp.asarray(x, jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * scale
    return y.astype(jnp.result_type(x))
