"""Gated DeltaNet layer (Yang, Kautz, Hatamizadeh 2024), with fla's layout and initialisation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hamjax import ops
from hamjax.nn.mixer import MixerStats, check_cache_size
from hamjax.nn.norm import RMSNorm
from hamjax.nn.projections import DeltaProjections
from hamjax.ops import validation


class GDNCache(NamedTuple):
    """rnn [B, H, K, V] float32; conv [B, W-1, H(2K + V)] (the last W-1 projected inputs)."""

    rnn: jax.Array
    conv: jax.Array


class GatedDeltaNet(nnx.Module):
    """y = W_o[RMSNorm(o) * SiLU(z)], o the gated delta rule (hamjax.ops) over the inputs from
    `DeltaProjections` (projections in `dtype`, weights in `param_dtype`; the recurrence in float32);
    RMSNorm per head over V. x [B, T, D] -> y [B, T, D]."""

    def __init__(
        self,
        d_model: int,
        heads: int,
        key_dim: int,
        value_dim: int,
        *,
        conv_width: int = 4,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        validation.check_positive_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size
        self.proj = DeltaProjections(
            d_model, heads, key_dim, value_dim, conv_width=conv_width, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.norm = RMSNorm(value_dim, eps=norm_eps)

    def init_cache(self, batch: int, max_len: int, capacity: int | None = None) -> GDNCache:
        """Empty cache for `batch` rows (hamjax.nn.mixer's protocol; max_len and capacity bound
        nothing here): zero RNN state and conv state."""
        check_cache_size(batch, max_len, capacity)
        p = self.proj
        rnn = jnp.zeros((batch, p.heads, p.key_dim, p.value_dim), jnp.float32)
        return GDNCache(rnn, p.conv.init_state(batch))

    def __call__(self, x, *, cache: GDNCache | None = None, segment_ids=None, valid=None, method: str = "chunk"):
        """x [B, T, D]; cache from `init_cache` or a previous call (None: empty); segment_ids [B, T]
        (a new segment resets the RNN and conv state); valid [B, T] (False = padding: leaves the cache
        unchanged; outputs there are to be ignored); method "chunk" or "recurrent".

        Returns (y [B, T, D], new cache, MixerStats() (none measured)). A length-1 input takes the
        single-step path.
        """
        cache = self.init_cache(*x.shape[:2]) if cache is None else cache
        inputs, conv = self.proj(x, cache.conv, segment_ids=segment_ids, valid=valid)
        rule = inputs[:5]  # q, k, v, g, beta
        if x.shape[1] == 1:
            o, rnn, _ = ops.gated_delta_rule_step(*(a[:, 0] for a in rule), cache.rnn)
            o = o[:, None]
        else:
            o, rnn, _ = ops.gated_delta_rule_with_errors(
                *rule, initial_state=cache.rnn, method=method, chunk_size=self.chunk_size, segment_ids=segment_ids
            )
        return self.proj.output(self.norm(o), inputs.z), GDNCache(rnn, conv), MixerStats()
