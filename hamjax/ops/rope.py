"""Rotary position embeddings at arbitrary (original) positions."""

from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x, positions, theta: float = 10000.0):
    """Rotate pairs (x[..., i], x[..., i + D/2]) by angle position * theta^(-2i/D).

    x [B, T, H, D] with D even; positions [B, T] int, or [1, T] when every row has the same ones
    (sin and cos, slow on CPU, are then computed once for all rows). Returns x's shape and dtype;
    math in float32.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head dimension, got x with shape {x.shape}")
    freqs = theta ** (-jnp.arange(d // 2, dtype=jnp.float32) * 2.0 / d)
    angle = jnp.asarray(positions, jnp.float32)[..., None, None] * freqs  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x32 = jnp.asarray(x, jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    # x cos + rotate_half(x) sin with the signs on sin: the same products as concatenating
    # (x1 cos - x2 sin, x1 sin + x2 cos), which XLA:CPU runs about 4x slower forward and backward.
    swapped = jnp.concatenate([x2, x1], axis=-1)
    out = x32 * jnp.concatenate([cos, cos], axis=-1) + swapped * jnp.concatenate([-sin, sin], axis=-1)
    return out.astype(x.dtype)
