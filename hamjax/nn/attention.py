"""Multi-head causal softmax attention, full or sliding-window, with RoPE: the Transformer baseline."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from hamjax import ops
from hamjax.ops import validation
from hamjax.ops.segments import segment_index


class Attention(nnx.Module):
    """y = W_o[softmax_j(q_t . k_j / sqrt(head_dim)) v_j] per head, over the keys j <= t (within the
    last `window` positions, t included, when `window` is given; all of them when None). q and k are
    RoPE-rotated at their positions (base `rope_theta`; None: no RoPE). x [B, T, D] -> y [B, T, D].

    Parameters: q_proj, k_proj, v_proj [D, H head_dim], out_proj [H head_dim, D]. No biases.
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        head_dim: int,
        *,
        window: int | None = None,
        rope_theta: float | None = 10000.0,
        rngs: nnx.Rngs,
    ):
        for name, value in (("d_model", d_model), ("heads", heads), ("head_dim", head_dim)):
            validation.check_positive_int(name, value)
        if window is not None:
            validation.check_positive_int("window", window)
        if rope_theta is not None:
            validation.check_positive_float("rope_theta", rope_theta)
            if head_dim % 2:
                raise ValueError(f"RoPE needs an even head_dim, got {head_dim} (or pass rope_theta=None)")
        self.d_model, self.heads, self.head_dim = d_model, heads, head_dim
        self.window, self.rope_theta = window, rope_theta
        linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
        self.q_proj = linear(d_model, heads * head_dim)
        self.k_proj = linear(d_model, heads * head_dim)
        self.v_proj = linear(d_model, heads * head_dim)
        self.out_proj = linear(heads * head_dim, d_model)

    def __call__(self, x, *, segment_ids=None, valid=None):
        """x [B, T, D] at positions 0..T-1; segment_ids [B, T] (a query sees only the keys of its own
        segment, a run of equal ids); valid [B, T] (False = padding: never a key, though the position
        counts it; outputs there are to be ignored). Returns y [B, T, D].
        """
        validation.check_sequence_inputs(x, self.d_model, segment_ids, valid)
        batch, t, _ = x.shape
        shape = (batch, t, self.heads, self.head_dim)
        q, k, v = (proj(x).reshape(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
        if self.rope_theta is not None:
            q, k = (ops.apply_rope(a, positions, self.rope_theta) for a in (q, k))
        valid = jnp.ones((batch, t), bool) if valid is None else jnp.asarray(valid, bool)
        o = ops.dense_routed_attention(
            q,
            k,
            v,
            jnp.broadcast_to(valid[..., None], shape[:3]),
            positions,
            logit_scale=jnp.full((self.heads,), self.head_dim**-0.5, jnp.float32),
            segment_ids=None if segment_ids is None else segment_index(segment_ids),
            window=self.window,
        )
        return self.out_proj(o.reshape(batch, t, -1))

