"""Float64 references for the numerics tests. Deliberately naive: they are the definition.

Layout (fla's): q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; state [B, H, K, V].
"""

from __future__ import annotations

import numpy as np


def _step(xp, state, q_t, k_t, v_t, g_t, beta_t, scale):
    """One token for all [B, H]: returns (new state, o_t, e_t)."""
    state = xp.exp(g_t)[..., None, None] * state
    error = v_t - xp.einsum("bhk,bhkv->bhv", k_t, state)
    state = state + beta_t[..., None, None] * k_t[..., :, None] * error[..., None, :]
    return state, xp.einsum("bhk,bhkv->bhv", scale * q_t, state), error


def _initial_state(xp, q, v, initial_state):
    if initial_state is None:
        return xp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), dtype=xp.float64)
    return xp.asarray(initial_state, dtype=xp.float64)


def gated_delta_rule_reference(q, k, v, g, beta, initial_state=None, scale=None):
    """Per-token gated delta rule in float64 NumPy; returns (o [B,T,H,V], state [B,H,K,V], errors).

    Per head and token: S~ = exp(g_t) S_{t-1}; e_t = v_t - S~^T k_t; S_t = S~ + beta_t k_t e_t^T;
    o_t = S_t^T (scale q_t).
    """
    q, k, v, g, beta = (np.asarray(x, dtype=np.float64) for x in (q, k, v, g, beta))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = _initial_state(np, q, v, initial_state)
    outputs, errors = [], []
    for t in range(q.shape[1]):
        state, o_t, e_t = _step(np, state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], scale)
        outputs.append(o_t)
        errors.append(e_t)
    return np.stack(outputs, axis=1), state, np.stack(errors, axis=1)


def gated_delta_rule_reference_jax(q, k, v, g, beta, initial_state=None, scale=None):
    """The same recurrence (same `_step`) as a float64 `lax.scan`, to differentiate with JAX.

    Call it under `jax.enable_x64(True)`; otherwise JAX silently computes in float32.
    """
    import jax
    import jax.numpy as jnp

    q, k, v, g, beta = (jnp.asarray(x, dtype=jnp.float64) for x in (q, k, v, g, beta))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = _initial_state(jnp, q, v, initial_state)

    def body(state, xs):
        state, o_t, e_t = _step(jnp, state, *xs, scale)
        return state, (o_t, e_t)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
    state, (o, e) = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(o, 0, 1), state, jnp.moveaxis(e, 0, 1)


def rel_rms(actual, expected) -> float:
    """sqrt(mean((a - e)^2)) / sqrt(mean(e^2)), in float64."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.sqrt(np.mean((a - e) ** 2)) / np.sqrt(np.mean(e**2)))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def random_inputs(seed, batch=2, steps=37, heads=3, dk=5, dv=7, initial_state=True):
    """Realistic float32 inputs as GDN produces them: dict(q, k, v, g, beta, initial_state).

    k is unit-norm along K; g = -exp(A_log) * softplus(x + dt_bias) <= 0 with A ~ U(1, 16) per head
    and dt ~ logU(1e-3, 1e-1) (98% of |g| in 1e-3..3, rare tails to ~15); beta = sigmoid(normal).
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, steps, heads, dk))
    k = rng.standard_normal((batch, steps, heads, dk))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((batch, steps, heads, dv))
    a_log = np.log(rng.uniform(1.0, 16.0, heads))
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), heads))
    dt_bias = dt + np.log(-np.expm1(-dt))  # inverse softplus
    g = -np.exp(a_log) * _softplus(rng.standard_normal((batch, steps, heads)) + dt_bias)
    beta = _sigmoid(rng.standard_normal((batch, steps, heads)))
    s0 = rng.standard_normal((batch, heads, dk, dv)) if initial_state else None
    out = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=s0)
    return {name: None if x is None else x.astype(np.float32) for name, x in out.items()}
