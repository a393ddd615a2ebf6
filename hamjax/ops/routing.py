"""Routing scores, admission to the KV cache, and the threshold controller.

A token enters a head's KV cache when its routing score exceeds the threshold tau, the cache is not
full, and the token is not padding. Scores come from the RNN's prediction error (surprise router) or
from a learned router sigmoid(MLP(x_t)) computed by the caller.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hamjax.ops import validation
from hamjax.ops.segments import segment_index, segment_starts


def surprise_scores(errors):
    """s_t = ||e_t||_2 / sqrt(V): errors [..., V] -> scores [...] (float32)."""
    errors = jnp.asarray(errors, jnp.float32)
    return jnp.sqrt(jnp.sum(errors * errors, axis=-1) / errors.shape[-1])


def admit(scores, tau, capacity: int, *, valid=None, segment_ids=None, initial_count=None):
    """Admission decisions for a whole sequence, equal to the token-by-token rule.

    scores [B, T, H]; tau a scalar or [H]; capacity the cache slots per (row, head); valid [B, T]
    (False = padding); segment_ids [B, T] (a new segment empties the cache); initial_count [B, H]
    entries already in the cache before token 0. Returns admitted [B, T, H] bool.

    Token t is admitted iff s_t > tau, it is valid, and fewer than `capacity` tokens of its segment
    (plus `initial_count` in the first segment) were admitted before it. Because every candidate is
    admitted until the cache is full, that is: candidate and (cumulative candidates <= capacity).
    """
    validation.check_nonnegative_int("capacity", capacity)
    scores = jnp.asarray(scores, jnp.float32)
    candidate = scores > jnp.asarray(tau, jnp.float32)
    if valid is not None:
        candidate &= jnp.asarray(valid, bool)[..., None]
    count = jnp.cumsum(candidate, axis=1, dtype=jnp.int32)
    if segment_ids is not None:
        # Subtract the count reached before each segment's first token.
        starts = segment_starts(segment_ids)[..., None]
        before_start = jnp.where(starts, count - candidate, 0)
        count = count - jax.lax.cummax(before_start, axis=1)
        first_segment = (segment_index(segment_ids) == 0)[..., None]
    else:
        first_segment = True
    if initial_count is not None:
        count = count + jnp.where(first_segment, jnp.asarray(initial_count, jnp.int32)[:, None, :], 0)
    return candidate & (count <= capacity)


def kv_fraction(admitted, valid=None):
    """Admitted tokens / non-padding tokens. admitted [B, T, H] -> (per layer scalar, per head [H])."""
    admitted = jnp.asarray(admitted, jnp.float32)
    weight = jnp.ones(admitted.shape[:2], jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    tokens = jnp.maximum(jnp.sum(weight), 1.0)
    per_head = jnp.einsum("bth,bt->h", admitted, weight) / tokens
    return jnp.mean(per_head), per_head


@dataclasses.dataclass(frozen=True)
class ThresholdConfig:
    """How tau moves. target_fraction=None keeps tau fixed at its initial value; otherwise after each
    training step log tau += learning_rate * (measured - target), except during the first
    `freeze_steps` steps, and is then clipped to [log min_tau, log max_tau]. per_head: one tau per
    head (log tau [H]) instead of one per layer (a scalar); decided here, at construction, so the
    state's shape never changes.

    `measured` is the fraction of valid tokens scoring above tau, admitted or not: a full cache caps
    the admitted fraction at capacity / T, and a controller fed that would push tau down without end
    whenever the target lies above it."""

    initial_tau: float = 0.5
    target_fraction: float | None = None
    learning_rate: float = 0.05
    freeze_steps: int = 0
    per_head: bool = False
    min_tau: float = 1e-4
    max_tau: float = 1e4

    def __post_init__(self):
        validation.check_positive_float("initial_tau", self.initial_tau)
        if self.target_fraction is not None and not 0.0 < self.target_fraction <= 1.0:
            raise ValueError(f"target_fraction must be in (0, 1], got {self.target_fraction!r}")
        validation.check_positive_float("learning_rate", self.learning_rate)
        validation.check_nonnegative_int("freeze_steps", self.freeze_steps)
        validation.check_positive_float("min_tau", self.min_tau)
        validation.check_positive_float("max_tau", self.max_tau)
        if not self.min_tau <= self.initial_tau <= self.max_tau:
            raise ValueError(
                f"initial_tau={self.initial_tau!r} must lie in [min_tau, max_tau] = "
                f"[{self.min_tau!r}, {self.max_tau!r}]"
            )


class ThresholdState(NamedTuple):
    """log_tau: float32 scalar, or [H] with ThresholdConfig.per_head; step: int32 count of controller
    updates."""

    log_tau: jax.Array
    step: jax.Array


def init_threshold(config: ThresholdConfig, heads: int | None = None) -> ThresholdState:
    """The controller's starting state: log tau = log initial_tau, a scalar or [heads] (per_head)."""
    shape = ()
    if config.per_head:
        if heads is None:
            raise ValueError("a per-head threshold (ThresholdConfig.per_head) needs the number of heads")
        validation.check_positive_int("heads", heads)
        shape = (heads,)
    return ThresholdState(jnp.full(shape, jnp.log(jnp.float32(config.initial_tau))), jnp.int32(0))


def update_threshold(state: ThresholdState, measured_fraction, config: ThresholdConfig) -> ThresholdState:
    """One controller step, a pure function of (state, measured fraction, step); no gradient flows.
    measured_fraction: the fraction of valid tokens scoring above tau, of log tau's shape (or one
    that broadcasts to it: a scalar moves every head alike); a shape that would change the state's
    raises."""
    measured_fraction = jax.lax.stop_gradient(jnp.asarray(measured_fraction, jnp.float32))
    shape = jnp.shape(state.log_tau)
    try:
        keeps_shape = jnp.broadcast_shapes(measured_fraction.shape, shape) == shape
    except ValueError:
        keeps_shape = False
    if not keeps_shape:
        raise ValueError(
            f"measured_fraction has shape {measured_fraction.shape}, which would change the threshold's shape "
            f"{shape} ({'one tau per head' if shape else 'one tau per layer'}; per_head is chosen in ThresholdConfig)"
        )
    if config.target_fraction is None:
        return state._replace(step=state.step + 1)
    active = state.step >= config.freeze_steps
    delta = config.learning_rate * (measured_fraction - config.target_fraction)
    log_tau = jnp.clip(
        state.log_tau + jnp.where(active, delta, 0.0), math.log(config.min_tau), math.log(config.max_tau)
    )
    return ThresholdState(log_tau.astype(jnp.float32), state.step + 1)
