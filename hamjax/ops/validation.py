"""Trace-time argument checks that raise ValueError naming the offending argument and its shape."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _shape(x) -> tuple[int, ...]:
    return tuple(jnp.shape(x))


def check_floating(name: str, x) -> None:
    """Raise unless `x` has a floating-point dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating-point dtype, got {dtype} (shape {_shape(x)})")


def check_rank(name: str, x, rank: int, layout: str) -> None:
    """Raise unless `x` has `rank` dimensions; `layout` names them, e.g. "[B, T, H, K]"."""
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {_shape(x)}")


def check_dims_match(
    names_and_arrays: Sequence[tuple[str, object]], dims: Sequence[int], what: str
) -> None:
    """Raise unless the given arrays agree on the listed dimensions (e.g. `what` = "B, T, H")."""
    ref_name, ref = names_and_arrays[0]
    ref_dims = tuple(_shape(ref)[d] for d in dims)
    for name, x in names_and_arrays[1:]:
        got = tuple(_shape(x)[d] for d in dims)
        if got != ref_dims:
            raise ValueError(
                f"{name} and {ref_name} disagree on ({what}): "
                f"{name} has shape {_shape(x)}, {ref_name} has shape {_shape(ref)}"
            )


def check_shape(name: str, x, expected: tuple[int, ...], layout: str) -> None:
    """Raise unless `x` has exactly the `expected` shape."""
    if _shape(x) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {_shape(x)}")


def check_positive_int(name: str, value) -> None:
    """Raise unless `value` is a Python int > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    """Raise unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_nonnegative_int(name: str, value) -> None:
    """Raise unless `value` is a Python int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def check_positive_float(name: str, value) -> None:
    """Raise unless `value` is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_not_nan(name: str, x) -> None:
    """Raise if a concrete `x` holds a NaN (traced values cannot be inspected and pass)."""
    if isinstance(x, jax.core.Tracer):
        return
    if np.isnan(np.asarray(x, np.float32)).any():
        raise ValueError(f"{name} must not be NaN, got {x!r}")


def check_integer(name: str, x) -> None:
    """Raise unless `x` has an integer dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {dtype} (shape {_shape(x)})")


def check_token_ids(name: str, tokens, vocab_size: int) -> None:
    """Raise unless `tokens` is integer and, when concrete, every id is in [0, vocab_size)."""
    check_integer(name, tokens)
    if isinstance(tokens, jax.core.Tracer):
        return
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0]
        raise ValueError(f"{name} holds id {int(bad)} outside the vocabulary [0, {vocab_size})")


def check_sequence_inputs(x, d_model: int, segment_ids=None, valid=None) -> None:
    """Raise unless x is [B, T, D] with D = d_model and segment_ids (integer), valid are [B, T]."""
    check_rank("x", x, 3, "[B, T, D]")
    batch, t, _ = _shape(x)
    check_shape("x", x, (batch, t, d_model), "[B, T, D]")
    if segment_ids is not None:
        check_integer("segment_ids", segment_ids)
        check_shape("segment_ids", segment_ids, (batch, t), "[B, T]")
    if valid is not None:
        check_shape("valid", valid, (batch, t), "[B, T]")
