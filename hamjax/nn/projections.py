"""The projections shared by GatedDeltaNet and HAM: inputs of the delta rule, gates, output."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hamjax.nn.conv import ShortConv
from hamjax.nn.variables import NoWeightDecay
from hamjax.ops import validation

A_MAX = 16.0  # A ~ U(0, 16], A_log = log A (fla's range; 0 excluded so that A_log is finite)
DT_RANGE = (1e-3, 1e-1)  # dt ~ logU(1e-3, 1e-1), dt_bias = softplus^-1(dt) (fla's range)


class DeltaInputs(NamedTuple):
    """q, k [B, T, H, K] unit vectors; v [B, T, H, V]; g (log decay <= 0), beta [B, T, H] float32,
    both 0 at padding so padding leaves the RNN state unchanged; z [B, T, H, V] output gate (pre-SiLU)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    beta: jax.Array
    z: jax.Array


class DeltaProjections(nnx.Module):
    """x [B, T, D] -> DeltaInputs (`__call__`), and the gated output projection (`output`). Per head:

        q, k, v = SiLU(conv(W_qkv x)), q and k L2-normalised
        z, b, a = W_gate x;  beta = sigmoid(b);  g = -exp(A_log) * softplus(a + dt_bias)
        y = W_o[h * SiLU(z)]   (h: the layer's normalised read-out)

    Parameters: qkv_proj [D, H(2K + V)] (columns q | k | v), conv (depthwise, width W, over those
    columns), gate_proj [D, H(V + 2)] (columns z | b | a), A_log and dt_bias [H] (NoWeightDecay),
    out_proj [HV, D]. No biases. The projections and the conv run in `dtype` with weights of
    `param_dtype` (A_log and dt_bias stay float32, as do the gates; q and k are normalised in float32
    and returned in `dtype`).
    """

    def __init__(
        self, d_model: int, heads: int, key_dim: int, value_dim: int, *, conv_width: int = 4, dtype=None,
        param_dtype=jnp.float32, rngs: nnx.Rngs,
    ):
        for name, value in (("d_model", d_model), ("heads", heads), ("key_dim", key_dim), ("value_dim", value_dim)):
            validation.check_positive_int(name, value)
        self.d_model, self.heads, self.key_dim, self.value_dim = d_model, heads, key_dim, value_dim
        qkv = heads * (2 * key_dim + value_dim)
        linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv_proj = linear(d_model, qkv)
        self.conv = ShortConv(qkv, conv_width, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(d_model, heads * (value_dim + 2))
        a = A_MAX * (1.0 - jax.random.uniform(rngs.params(), (heads,), jnp.float32))
        self.A_log = NoWeightDecay(jnp.log(a))
        log_dt = jax.random.uniform(rngs.params(), (heads,), jnp.float32, *map(math.log, DT_RANGE))
        dt = jnp.exp(log_dt)
        self.dt_bias = NoWeightDecay(dt + jnp.log(-jnp.expm1(-dt)))
        self.out_proj = linear(heads * value_dim, d_model)

    def __call__(self, x, conv_state, *, segment_ids=None, valid=None):
        """x [B, T, D]; conv_state [B, W-1, H(2K + V)]; segment_ids, valid [B, T].

        Returns (DeltaInputs, new conv state). A length-1 input takes the conv's single-step path.
        """
        validation.check_sequence_inputs(x, self.d_model, segment_ids, valid)
        batch, t, _ = x.shape
        heads, dk, dv = self.heads, self.key_dim, self.value_dim
        qkv, conv_state = self.conv(self.qkv_proj(x), conv_state, segment_ids=segment_ids, valid=valid)
        q, k, v = jnp.split(jax.nn.silu(qkv), [heads * dk, 2 * heads * dk], axis=-1)
        q, k = (_l2_normalize(a.reshape(batch, t, heads, dk)) for a in (q, k))
        z, b, a = jnp.split(self.gate_proj(x), [heads * dv, heads * (dv + 1)], axis=-1)
        beta = jax.nn.sigmoid(b.astype(jnp.float32))
        g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(a.astype(jnp.float32) + self.dt_bias[...])
        if valid is not None:
            valid = jnp.asarray(valid, bool)[..., None]
            g, beta = jnp.where(valid, g, 0.0), jnp.where(valid, beta, 0.0)
        shape = (batch, t, heads, dv)
        return DeltaInputs(q, k, v.reshape(shape), g, beta, z.reshape(shape)), conv_state

    def output(self, h, z):
        """h, z [B, T, H, V] -> y = W_o[h * SiLU(z)] [B, T, D]."""
        batch, t = h.shape[:2]
        return self.out_proj(_gate(h, z).reshape(batch, t, -1))


@jax.checkpoint
def _gate(h, z):
    """h * SiLU(z), computed in float32 and returned in z's dtype; recomputed in the backward pass,
    which keeps only h and z."""
    return (h * jax.nn.silu(z.astype(jnp.float32))).astype(z.dtype)


@jax.checkpoint
def _l2_normalize(x):
    """x / sqrt(sum(x^2) + 1e-6) over the last axis (fla's l2norm), computed in float32 and returned
    in x's dtype; recomputed in the backward pass, which keeps only x."""
    x32 = jnp.asarray(x, jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)
