"""Helpers shared by the nn layer tests: one jitted call, a token-by-token loop, tree comparison."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oracles import rel_rms

TOL = 1e-5  # relative RMS error allowed in float32 (DESIGN.md §2)


def normal(seed, *shapes):
    """Standard normal float32 arrays of the given shapes (NumPy: no compilation per shape)."""
    rng = np.random.default_rng(seed)
    arrays = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes]
    return arrays[0] if len(arrays) == 1 else arrays


def call(model, x, cache, segment_ids=None, valid=None, method="chunk"):
    """model(x, ...) under one shared nnx.jit, so that tests reuse each other's compilations (pass a
    cache always: cache=None would compile another version)."""
    return _call(model, x, cache, segment_ids, valid, method)


@nnx.jit(static_argnums=5)
def _call(model, x, cache, segment_ids, valid, method):
    """Positional arguments only: jit caches keyword and positional calls separately."""
    return model(x, cache=cache, segment_ids=segment_ids, valid=valid, method=method)


def call_steps(model, x, cache, valid=None):
    """Feed x [B, T, D] to `model` one token at a time from `cache`.

    Returns (y [B, T, D], final cache, the list of each step's remaining outputs).
    """
    ys, extras = [], []
    for t in range(x.shape[1]):
        y, cache, *rest = call(model, x[:, t : t + 1], cache, None, None if valid is None else valid[:, t : t + 1])
        ys.append(y)
        extras.append(rest)
    return jnp.concatenate(ys, axis=1), cache, extras


def assert_tree_close(actual, expected, tol=TOL):
    """Same tree structure and shapes; floating leaves within `tol` relative RMS error (absolute
    when the expected leaf is all zeros); other leaves exactly equal."""
    flat_actual, tree_actual = jax.tree_util.tree_flatten_with_path(actual)
    flat_expected, tree_expected = jax.tree_util.tree_flatten_with_path(expected)
    assert tree_actual == tree_expected, (tree_actual, tree_expected)
    for (path, a), (_, e) in zip(flat_actual, flat_expected):
        name = jax.tree_util.keystr(path)
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, (name, a.shape, e.shape)
        if np.issubdtype(e.dtype, np.floating):
            error = rel_rms(a, e) if np.any(e) else float(np.max(np.abs(a), initial=0.0))
            assert error <= tol, f"{name}: error {error:.3g} > {tol}"
        else:
            np.testing.assert_array_equal(a, e, err_msg=name)
