"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.ops import validation


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy (argmax). Otherwise the token is drawn from softmax(logits /
    temperature) restricted to the `top_k` most likely tokens (None: all), then to the smallest set
    of the most likely ones whose probability reaches `top_p` (None or 1: all)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (_is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None:
            validation.check_positive_int("top_k", self.top_k)
        if self.top_p is not None and not (_is_real(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_real(x) -> bool:
    """A real number (NumPy scalars included), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def filter_logits(logits, config: SamplingConfig):
    """logits [B, V] -> float32 [B, V] divided by the temperature, -inf outside top-k and top-p."""
    logits = jnp.asarray(logits, jnp.float32) / (config.temperature or 1.0)
    vocab = logits.shape[-1]
    # Every token by descending logit; ties keep the lower id first, as argmax does.
    order = jnp.argsort(-logits, axis=-1, stable=True)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    keep = jnp.ones(ranked.shape, bool)
    if config.top_k is not None:
        keep &= jnp.arange(vocab) < config.top_k
    if config.top_p is not None and config.top_p < 1.0:
        probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        keep &= before < config.top_p
    rows = jnp.arange(logits.shape[0])[:, None]
    kept = jnp.zeros(logits.shape, bool).at[rows, order].set(keep)
    return jnp.where(kept, logits, -jnp.inf)


def sample(logits, key, config: SamplingConfig):
    """logits [B, V]; key a jax.random key -> token ids [B] int32."""
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, config), axis=-1).astype(jnp.int32)
