"""The gated feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from hamjax.ops import validation


class SwiGLU(nnx.Module):
    """y = W_down[SiLU(W_gate x) * W_up x]. x [B, T, D] -> y [B, T, D] (any leading axes).

    Parameters: gate_proj, up_proj [D, hidden], down_proj [hidden, D] (param_dtype), no biases;
    matmuls in `dtype` (None: the inputs' and parameters' promoted dtype, as flax's).
    """

    def __init__(self, d_model: int, hidden: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        for name, value in (("d_model", d_model), ("hidden", hidden)):
            validation.check_positive_int(name, value)
        linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(d_model, hidden)
        self.up_proj = linear(d_model, hidden)
        self.down_proj = linear(hidden, d_model)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
