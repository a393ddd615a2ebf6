"""RMSNorm over the last axis, computed in float32."""

from __future__ import annotations

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
        x32 = jnp.asarray(x, jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps) * self.scale[...]
        return y.astype(jnp.result_type(x))
