"""The one call protocol every token mixer (HAM, GatedDeltaNet, Attention) follows.

    mixer.init_cache(batch, max_len, capacity=None) -> the mixer's typed cache
    mixer(x, *, cache=None, segment_ids=None, valid=None, **extras) -> (y, cache, MixerStats)

x, y [B, T, D]. max_len: the longest context a decode will reach (full attention sizes its cache by
it; the recurrent mixers need no such bound); capacity: HAM's KV slots per row and head (None: the
layer's own; the other mixers hold none). The returned cache continues the context; attention called
without a cache keeps none and returns None. Extras are the mixer's own (HAM: tau, method, evict;
GDN: method).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from hamjax.ops import validation


class MixerStats(NamedTuple):
    """What a call measured, None where the mixer has no such thing (all None but for HAM):
    admitted [B, T, H] bool (the tokens written to the KV cache); scores [B, T, H] float32 (routing
    scores); kv_fraction (scalar) and kv_fraction_per_head [H]: admitted / valid tokens; over_tau
    (scalar) and over_tau_per_head [H]: valid tokens scoring above tau / valid tokens, admitted or
    not (a full cache refuses them): what the threshold controller follows."""

    admitted: jax.Array | None = None
    scores: jax.Array | None = None
    kv_fraction: jax.Array | None = None
    kv_fraction_per_head: jax.Array | None = None
    over_tau: jax.Array | None = None
    over_tau_per_head: jax.Array | None = None


def check_cache_size(batch: int, max_len: int, capacity: int | None) -> None:
    """The arguments of init_cache: positive batch and max_len, capacity positive or None."""
    validation.check_positive_int("batch", batch)
    validation.check_positive_int("max_len", max_len)
    if capacity is not None:
        validation.check_positive_int("capacity", capacity)
