"""hamjax.ops.routing: surprise scores, admission (== a token-by-token loop), the KV fraction and the
threshold controller (DESIGN.md §1.1 steps 4 and 6, §1.2, §1.3)."""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hamjax import ops
from hamjax.ops import ThresholdConfig, ThresholdState
from oracles import admit_reference

# ------------------------------------------------------------------------------------- scores


def test_surprise_scores_are_error_norm_over_sqrt_v():
    errors = np.random.default_rng(0).standard_normal((2, 9, 3, 7)).astype(np.float32)
    scores = jax.jit(ops.surprise_scores)(errors)
    chex.assert_shape(scores, (2, 9, 3))
    chex.assert_type(scores, jnp.float32)
    expected = np.linalg.norm(errors.astype(np.float64), axis=-1) / math.sqrt(7)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------ admission


def segment_ids_with_boundaries(rng, batch, steps, segments):
    """[B, T] int32 ids with `segments - 1` random boundaries per row (ids need not increase)."""
    ids = np.zeros((batch, steps), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, steps), segments - 1, replace=False))
        for i, cut in enumerate(cuts):
            ids[b, cut:] = (i + 1) * (-1) ** i  # ... 0, 1, -2, 3: a change of id starts a segment
    return ids


_admit = jax.jit(ops.admit, static_argnums=2)

ADMIT_CASES = {
    # name: (capacity, with valid, with segment_ids, with initial_count, per-head tau)
    "plain": (5, False, False, False, False),
    "capacity_0": (0, True, True, True, False),
    "capacity_1_valid": (1, True, False, False, True),
    "capacity_3_all_options": (3, True, True, True, True),
    "capacity_6_segments": (6, False, True, False, False),
    "capacity_6_initial_count": (6, False, False, True, True),
    "capacity_above_T": (100, True, True, True, False),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ADMIT_CASES)
def test_admit_equals_sequential_loop(name, seed):
    capacity, with_valid, with_segments, with_initial, per_head = ADMIT_CASES[name]
    rng = np.random.default_rng(seed)
    batch, steps, heads = 3, 41, 4
    scores = rng.random((batch, steps, heads)).astype(np.float32)
    tau = rng.uniform(0.2, 0.7, heads if per_head else ()).astype(np.float32)
    valid = rng.random((batch, steps)) > 0.2 if with_valid else None
    segment_ids = segment_ids_with_boundaries(rng, batch, steps, 4) if with_segments else None
    initial_count = rng.integers(0, capacity + 1, (batch, heads)).astype(np.int32) if with_initial else None
    got = np.asarray(_admit(scores, tau, capacity, valid=valid, segment_ids=segment_ids,
                           initial_count=initial_count))
    expected = admit_reference(scores, tau, capacity, valid, segment_ids, initial_count)
    np.testing.assert_array_equal(got, expected)
    # The case must exercise what it names: a full cache turns candidates away when capacity < T.
    candidates = (scores > tau) & (True if valid is None else valid[..., None])
    if capacity < steps:
        assert (candidates & ~expected).any(), "no candidate was turned away: the capacity is not tested"


def test_admit_rejects_bad_capacity():
    with pytest.raises(ValueError, match=r"^capacity\b.*-1"):
        ops.admit(np.zeros((1, 3, 2), np.float32), 0.5, -1)
    with pytest.raises(ValueError, match=r"^capacity\b"):
        ops.admit(np.zeros((1, 3, 2), np.float32), 0.5, 2.0)


# ----------------------------------------------------------------------------------- KV fraction


def test_kv_fraction_counts_admitted_over_valid_tokens():
    rng = np.random.default_rng(3)
    admitted = rng.random((2, 13, 3)) > 0.6
    valid = rng.random((2, 13)) > 0.3
    admitted &= valid[..., None]
    fraction, per_head = jax.jit(ops.kv_fraction)(admitted, valid)
    expected = admitted.sum(axis=(0, 1)) / valid.sum()
    np.testing.assert_allclose(per_head, expected, rtol=1e-6)
    np.testing.assert_allclose(fraction, expected.mean(), rtol=1e-6)
    fraction, per_head = ops.kv_fraction(admitted)  # no padding: all B * T tokens count
    np.testing.assert_allclose(per_head, admitted.sum(axis=(0, 1)) / 26, rtol=1e-6)
    fraction, per_head = ops.kv_fraction(np.zeros((2, 4, 3), bool), np.zeros((2, 4), bool))
    assert float(fraction) == 0.0 and np.all(np.asarray(per_head) == 0.0), "all padding must give 0, not NaN"


# -------------------------------------------------------------------------- threshold controller

SAMPLES_PER_STEP = 4096


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def run_controller(config, steps, key, state=None):
    """`steps` controller updates on a stationary stream: every step draws fresh Exponential(1)
    scores and measures the fraction above tau = exp(log_tau). Returns (final state, (measured [N],
    log_tau [N] after each update))."""
    state = ops.init_threshold(config) if state is None else state

    def body(state, key):
        scores = jax.random.exponential(key, (SAMPLES_PER_STEP,))
        measured = jnp.mean(scores > jnp.exp(state.log_tau))
        state = ops.update_threshold(state, measured, config)
        return state, (measured, state.log_tau)

    return jax.lax.scan(body, state, jax.random.split(key, steps))


CONVERGE_STEPS, TAIL = 2000, 100


@pytest.mark.parametrize("initial_tau", [0.01, 20.0])
@pytest.mark.parametrize("target", [0.1, 0.5, 0.9])
def test_controller_reaches_target_fraction(target, initial_tau):
    """Exponential(1) scores: P(s > tau) = exp(-tau), so the fixed point is tau* = -log(target).
    After 2000 steps (eta = 0.05, 4096 samples a step) the last 100 measured fractions average within
    0.01 of the target and log tau is within 0.02 of log tau*. The slowest case (target 0.9 from
    tau = 0.01) moves at most eta * (1 - 0.9) = 0.005 in log tau per step while every score passes,
    ~470 steps, then contracts by 1 - eta * tau* * target ~ 0.995 per step."""
    config = ThresholdConfig(initial_tau=initial_tau, target_fraction=target, learning_rate=0.05)
    state, (measured, _) = run_controller(config, CONVERGE_STEPS, jax.random.key(int(target * 10)))
    tail = float(np.mean(np.asarray(measured)[-TAIL:]))
    assert abs(tail - target) <= 0.01, (
        f"measured fraction {tail:.4f} after {CONVERGE_STEPS} steps, target {target}")
    log_tau_star = math.log(-math.log(target))
    assert abs(float(state.log_tau) - log_tau_star) <= 0.02, (
        f"log tau {float(state.log_tau):.4f}, expected {log_tau_star:.4f}")
    assert int(state.step) == CONVERGE_STEPS
    # Far from the target at the start, so the test shows movement, not a lucky initial value.
    assert abs(float(np.asarray(measured)[0]) - target) > 0.05


def test_controller_is_frozen_for_freeze_steps_then_moves():
    config = ThresholdConfig(initial_tau=0.5, target_fraction=0.3, learning_rate=0.05, freeze_steps=7)
    update = jax.jit(ops.update_threshold, static_argnames="config")
    state = ops.init_threshold(config)
    log_tau0 = float(state.log_tau)
    for i in range(config.freeze_steps):
        state = update(state, 0.9, config=config)
        assert float(state.log_tau) == log_tau0, f"tau moved during freeze (update {i + 1})"
        assert int(state.step) == i + 1
    state = update(state, 0.9, config=config)
    np.testing.assert_allclose(float(state.log_tau), log_tau0 + 0.05 * (0.9 - 0.3), rtol=1e-6)
    state = update(state, 0.1, config=config)  # below target: tau goes back down
    np.testing.assert_allclose(float(state.log_tau), log_tau0 + 0.05 * (0.9 - 0.3 + 0.1 - 0.3), rtol=1e-5)


def test_fixed_mode_never_moves():
    config = ThresholdConfig(initial_tau=0.7, target_fraction=None)
    state, (measured, log_tau) = run_controller(config, 50, jax.random.key(0))
    np.testing.assert_array_equal(log_tau, np.full(50, ops.init_threshold(config).log_tau))
    assert int(state.step) == 50
    assert np.ptp(np.asarray(measured)) > 0.0  # the measured fraction did vary


def test_controller_state_is_a_pytree_and_jits():
    config = ThresholdConfig(initial_tau=0.5, target_fraction=0.25, learning_rate=0.1)
    state = ops.init_threshold(config)
    leaves, treedef = jax.tree.flatten(state)
    assert len(leaves) == 2 and all(isinstance(x, jax.Array) for x in leaves)
    assert jax.tree.unflatten(treedef, leaves) == state
    chex.assert_type(state.log_tau, jnp.float32)
    chex.assert_type(state.step, jnp.int32)
    jitted = jax.jit(ops.update_threshold, static_argnames="config")(state, 0.75, config=config)
    eager = ops.update_threshold(state, 0.75, config)
    chex.assert_trees_all_equal(jitted, eager)
    assert isinstance(jitted, ThresholdState)
    chex.assert_trees_all_equal_shapes_and_dtypes(jitted, state)
    # No gradient flows through the controller into the measured fraction.
    grad = jax.grad(lambda m: ops.update_threshold(state, m, config).log_tau)(0.5)
    assert float(grad) == 0.0


def test_controller_per_head_state_moves_each_head_independently():
    config = ThresholdConfig(initial_tau=0.5, target_fraction=0.5, learning_rate=0.1, per_head=True)
    state = ops.init_threshold(config, heads=3)
    chex.assert_shape(state.log_tau, (3,))
    measured = jnp.array([0.2, 0.5, 0.9], jnp.float32)
    new = jax.jit(ops.update_threshold, static_argnames="config")(state, measured, config=config)
    chex.assert_shape(new.log_tau, (3,))
    np.testing.assert_allclose(new.log_tau - state.log_tau, 0.1 * (np.asarray(measured) - 0.5), atol=1e-7)


def test_a_measurement_cannot_change_the_thresholds_shape():
    """One tau per layer stays one: a per-head measurement raises (it used to turn log tau into [H],
    so jitted callers retraced and checkpoints no longer restored into a fresh model). A scalar may
    move every head of a per-head threshold alike."""
    config = ThresholdConfig(target_fraction=0.5)
    with pytest.raises(ValueError, match=r"measured_fraction has shape \(3,\).*threshold's shape \(\)"):
        ops.update_threshold(ops.init_threshold(config), jnp.zeros(3), config)
    per_head = dataclasses.replace(config, per_head=True)
    with pytest.raises(ValueError, match=r"shape \(2,\).*shape \(3,\)"):
        ops.update_threshold(ops.init_threshold(per_head, 3), jnp.zeros(2), per_head)
    moved = ops.update_threshold(ops.init_threshold(per_head, 3), 0.0, per_head)
    chex.assert_shape(moved.log_tau, (3,))
    with pytest.raises(ValueError, match="number of heads"):
        ops.init_threshold(per_head)


def test_log_tau_stays_within_its_bounds():
    """A target that is never met (no token over tau, or all of them) pins tau at a bound instead of
    winding it up without end."""
    config = ThresholdConfig(initial_tau=0.5, target_fraction=0.25, learning_rate=0.5, min_tau=1e-3, max_tau=10.0)
    update = jax.jit(ops.update_threshold, static_argnames="config")
    for measured, bound in ((0.0, 1e-3), (1.0, 10.0)):
        state = ops.init_threshold(config)
        for _ in range(100):  # 100 x 0.5 x 0.25 = 12.5 in log tau: far past either bound
            state = update(state, measured, config=config)
        np.testing.assert_allclose(np.exp(state.log_tau), bound, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(target_fraction=0.0), "target_fraction"),
        (dict(target_fraction=-0.1), "target_fraction"),
        (dict(target_fraction=1.5), "target_fraction"),
        (dict(target_fraction=float("nan")), "target_fraction"),
        (dict(initial_tau=0.0), "initial_tau"),
        (dict(initial_tau=float("inf")), "initial_tau"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(freeze_steps=-1), "freeze_steps"),
        (dict(min_tau=0.0), "min_tau"),
        (dict(max_tau=float("inf")), "max_tau"),
        (dict(initial_tau=0.5, min_tau=0.6), "initial_tau"),
        (dict(initial_tau=0.5, max_tau=0.4), "initial_tau"),
    ],
    ids=["target_0", "target_negative", "target_above_1", "target_nan", "initial_tau_0",
         "initial_tau_inf", "learning_rate_0", "freeze_steps_negative", "min_tau_0", "max_tau_inf",
         "initial_tau_below_min", "initial_tau_above_max"],
)
def test_threshold_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ThresholdConfig(**kwargs)


def test_threshold_config_accepts_boundary_target():
    assert ThresholdConfig(target_fraction=1.0).target_fraction == 1.0
