"""Float64 references for the numerics tests. Deliberately naive: they are the definition.

Layout (fla's): q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; state [B, H, K, V].
"""

from __future__ import annotations

from typing import NamedTuple

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


def assert_close(got, want, label, tol=1e-5):
    """got has want's shape, is finite and within `tol` relative RMS error of it (default: float32
    against a float64 oracle)."""
    got = np.asarray(got, np.float64)
    assert got.shape == np.shape(want), f"{label}: shape {got.shape} != {np.shape(want)}"
    assert np.isfinite(got).all(), f"{label}: non-finite values"
    err = rel_rms(got, want)
    assert err <= tol, f"{label}: relative RMS error {err:.2e} > {tol:.0e}"


def unit(x):
    """x / ||x|| along the last axis, as float32 (queries and keys as HAM's are)."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


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


# ------------------------------------------------------------------------------- HAM references


def rope_reference(x, positions, theta=10000.0):
    """RoPE in float64: rotate the pairs (x[..., i], x[..., i + D/2]) by positions * theta^(-2i/D).

    x [..., D]; positions broadcastable to x.shape[:-1]. theta None: no rotation.
    """
    x = np.asarray(x, dtype=np.float64)
    if theta is None:
        return x
    half = x.shape[-1] // 2
    angle = np.asarray(positions, np.float64)[..., None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x1 * np.sin(angle) + x2 * np.cos(angle)], -1)


def softmax_read(q, keys, values, scale, log_weights=None):
    """One query: sum_j softmax_j(scale q . k_j + log_weights_j) v_j; zeros when there is no key.

    q [K]; keys [S, K]; values [S, V]; log_weights [S] or None.
    """
    if len(keys) == 0:
        return np.zeros(np.shape(values)[-1])
    logits = scale * (np.asarray(keys, np.float64) @ q)
    if log_weights is not None:
        logits = logits + log_weights
    weights = np.exp(logits - logits.max())
    return (weights / weights.sum()) @ np.asarray(values, np.float64)


def masked_attention_reference(q, keys, values, mask, logit_scale, log_weights=None):
    """q [B, T, H, K]; keys [B, H, S, K]; values [B, H, S, V]; mask [B, H, T, S] bool; logit_scale
    [H]; log_weights [B, H, S] or None. Query t reads softmax over the keys j with mask[b, h, t, j]
    (zeros if none). Returns [B, T, H, V]."""
    q, keys, values = (np.asarray(x, np.float64) for x in (q, keys, values))
    batch, steps, heads, _ = q.shape
    out = np.zeros((batch, steps, heads, values.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            for t in range(steps):
                sel = np.asarray(mask[b, h, t], bool)
                lw = None if log_weights is None else np.asarray(log_weights, np.float64)[b, h, sel]
                out[b, t, h] = softmax_read(q[b, t, h], keys[b, h, sel], values[b, h, sel], logit_scale[h], lw)
    return out


class RefState(NamedTuple):
    """HAM state in float64 NumPy: rnn [B, H, K, V]; the cache keys [B, H, C, K] (RoPE-rotated at
    their positions), values [B, H, C, V], positions [B, H, C], scores [B, H, C], count [B, H]
    (slots >= count are unused); position [B] of the next token."""

    rnn: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray
    scores: np.ndarray
    count: np.ndarray
    position: np.ndarray


class HamReference(NamedTuple):
    o_rnn: np.ndarray
    o_attn: np.ndarray
    admitted: np.ndarray
    scores: np.ndarray
    state: RefState


def empty_ref_state(batch, heads, dk, dv, capacity, position=0):
    return RefState(
        np.zeros((batch, heads, dk, dv)),
        np.zeros((batch, heads, capacity, dk)),
        np.zeros((batch, heads, capacity, dv)),
        np.full((batch, heads, capacity), -1, np.int64),
        np.zeros((batch, heads, capacity)),
        np.zeros((batch, heads), np.int64),
        np.full((batch,), position, np.int64),
    )


def ham_reference(q, k, v, g, beta, *, tau, logit_scale, capacity, router_scores=None, valid=None,
                  rope_theta=10000.0, state=None):
    """Per-token HAM core (DESIGN.md §1.1 steps 2-7) in float64 NumPy, one (row, head) at a time.

    q, k [B, T, H, K]; v [B, T, H, V]; g, beta, router_scores [B, T, H]; valid [B, T]; tau scalar or
    [H]; logit_scale [H]; state a RefState (None: empty, position 0). Per token at position p:
      padding (valid False): no decay and no write; never admitted.
      S~ = e^g S; e = v - S~^T k; S = S~ + beta k e^T; o_rnn = S^T q / sqrt(K);
      s = ||e|| / sqrt(V) (surprise router) or router_scores (learned router);
      admitted = valid and s > tau and len(cache) < capacity -> cache takes (RoPE(k, p), v, p, s);
      o_attn = softmax_j(logit_scale * RoPE(q, p) . key_j [+ log s_j if learned]) v_j over the cache,
      0 if the cache is empty.
    """
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    batch, steps, heads, dk = q.shape
    dv = v.shape[-1]
    valid = np.ones((batch, steps), bool) if valid is None else np.asarray(valid, bool)
    tau = np.broadcast_to(np.asarray(tau, np.float64), (heads,))
    logit_scale = np.asarray(logit_scale, np.float64)
    state = empty_ref_state(batch, heads, dk, dv, capacity) if state is None else state
    out = empty_ref_state(batch, heads, dk, dv, capacity, 0)._replace(
        position=np.asarray(state.position) + steps)
    o_rnn, o_attn = np.zeros((2, batch, steps, heads, dv))
    admitted, scores = np.zeros((batch, steps, heads), bool), np.zeros((batch, steps, heads))
    for b in range(batch):
        for h in range(heads):
            s_mat = np.asarray(state.rnn[b, h], np.float64)
            cache = [tuple(np.asarray(x[b, h, i], np.float64) for x in state[1:5])
                     for i in range(int(state.count[b, h]))]
            for t in range(steps):
                pos = int(state.position[b]) + t
                if valid[b, t]:
                    s_mat = np.exp(g[b, t, h]) * s_mat
                error = v[b, t, h] - s_mat.T @ k[b, t, h]
                if valid[b, t]:
                    s_mat = s_mat + beta[b, t, h] * np.outer(k[b, t, h], error)
                o_rnn[b, t, h] = s_mat.T @ q[b, t, h] / np.sqrt(dk)
                score = np.linalg.norm(error) / np.sqrt(dv) if router_scores is None else router_scores[b, t, h]
                scores[b, t, h] = score
                admitted[b, t, h] = valid[b, t] and score > tau[h] and len(cache) < capacity
                if admitted[b, t, h]:
                    cache.append((rope_reference(k[b, t, h], pos, rope_theta), v[b, t, h], pos, score))
                if cache:
                    keys, values, _, key_scores = (np.stack(x) for x in zip(*cache))
                    lw = None if router_scores is None else np.log(key_scores)
                    o_attn[b, t, h] = softmax_read(rope_reference(q[b, t, h], pos, rope_theta), keys, values,
                                                   logit_scale[h], lw)
            out.rnn[b, h] = s_mat
            out.count[b, h] = len(cache)
            for i, entry in enumerate(cache):
                for field, x in zip(out[1:5], entry):
                    field[b, h, i] = x
    return HamReference(o_rnn, o_attn, admitted, scores, out)


def ham_reference_segmented(q, k, v, g, beta, *, segment_ids, state=None, router_scores=None, valid=None,
                            **kwargs):
    """`ham_reference` for packed rows: each segment (a run of equal ids) run on its own, the first
    from `state`, the others from an empty state at their first position; the final state is the
    last segment's. Token 0 continues `state`."""
    batch, steps, heads, dk = np.shape(q)
    dv = np.shape(v)[-1]
    capacity = kwargs["capacity"]
    state = empty_ref_state(batch, heads, dk, dv, capacity) if state is None else state
    inputs = dict(q=q, k=k, v=v, g=g, beta=beta, router_scores=router_scores, valid=valid)
    rows = []
    for b, ids in enumerate(np.asarray(segment_ids)):
        bounds = [0] + [t for t in range(1, steps) if ids[t] != ids[t - 1]] + [steps]
        row_state = RefState(*(np.asarray(x)[b : b + 1] for x in state))
        pieces = []
        for first, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if first:
                row_state = empty_ref_state(1, heads, dk, dv, capacity, int(state.position[b]) + lo)
            piece = {n: None if x is None else np.asarray(x)[b : b + 1, lo:hi] for n, x in inputs.items()}
            result = ham_reference(**piece, state=row_state, **kwargs)
            row_state = result.state
            pieces.append(result)
        rows.append(HamReference(*(np.concatenate(x, axis=1) for x in zip(*(p[:4] for p in pieces))),
                                 result.state))
    return HamReference(*(np.concatenate(x) for x in zip(*(r[:4] for r in rows))),
                        RefState(*(np.concatenate(x) for x in zip(*(r.state for r in rows)))))


def admit_reference(scores, tau, capacity, valid=None, segment_ids=None, initial_count=None):
    """Admission token by token, per (row, head): a token whose segment id differs from the previous
    token's empties the cache; a valid token with score > tau enters if fewer than `capacity` entries
    are there. scores [B, T, H] (compared as given, no cast); tau scalar or [H]; initial_count [B, H]."""
    batch, steps, heads = scores.shape
    tau = np.broadcast_to(tau, (heads,))
    admitted = np.zeros(scores.shape, bool)
    for b in range(batch):
        for h in range(heads):
            count = 0 if initial_count is None else int(initial_count[b, h])
            for t in range(steps):
                if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    count = 0
                if (valid is None or valid[b, t]) and scores[b, t, h] > tau[h] and count < capacity:
                    admitted[b, t, h] = True
                    count += 1
    return admitted


def masked_attention_reference_jax(q, keys, values, mask, logit_scale, log_weights=None):
    """`masked_attention_reference` as one float64 jnp expression, to differentiate with JAX (call
    it under `jax.enable_x64(True)`). Queries with no key read 0."""
    import jax.numpy as jnp

    q, keys, values, logit_scale = (jnp.asarray(x, jnp.float64) for x in (q, keys, values, logit_scale))
    logits = jnp.einsum("bthk,bhsk->bhts", q, keys) * logit_scale[:, None, None]
    if log_weights is not None:
        logits = logits + jnp.asarray(log_weights, jnp.float64)[:, :, None, :]
    logits = jnp.where(mask, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)
    weights = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bhts,bhsv->bhtv", weights / jnp.where(total > 0, total, 1.0), values)
    return jnp.moveaxis(out, 1, 2)
