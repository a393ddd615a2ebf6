"""hamjax.train.sweep: runs of several seeds and learning rates trained as one vmapped program equal
the same runs trained one at a time (parameters, optimizer state, thresholds and losses, fp32)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hamjax.data import MQARConfig, mqar_batch
from hamjax.nn import LanguageModel
from hamjax.train import TrainConfig, make_optimizer, preset, recall_train_step, train_step
from hamjax.train.sweep import Sweep

TASK = MQARConfig(vocab_size=64, seq_len=32, num_pairs=4)
MODEL = dataclasses.replace(preset("tiny").model, vocab_size=64, pattern="ham,attention", kv_target=0.25, tau_lr=0.5)
RUNS = [TrainConfig(learning_rate=3e-3, seed=0, warmup_steps=1, steps=10),
        TrainConfig(learning_rate=3e-3, seed=1, warmup_steps=1, steps=10),
        TrainConfig(learning_rate=1e-2, seed=0, warmup_steps=1, steps=10)]
STEPS = 4


def assert_close(actual, expected, what):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
    assert tree_a == tree_e, what
    for (path, a), (_, e) in zip(flat_a, flat_e):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def one_at_a_time(step, batches):
    """Each run of RUNS alone: (its states after the steps, its StepMetrics per step)."""
    results = []
    for tc in RUNS:
        model = LanguageModel(MODEL, rngs=nnx.Rngs(tc.seed))
        optimizer = make_optimizer(model, tc)
        metrics = [step(model, optimizer, *batch) for batch in batches]
        results.append((nnx.state((model, optimizer)), metrics))
    return results


@pytest.mark.parametrize("kind", ["recall", "language_model"])
def test_a_sweep_equals_its_runs_one_at_a_time(kind):
    if kind == "recall":
        batches = [tuple(jnp.asarray(x) for x in mqar_batch(TASK, 8, seed=s)) for s in range(STEPS)]
        alone, sweep_step = one_at_a_time(recall_train_step, batches), Sweep.recall_step
    else:
        rng = np.random.default_rng(0)
        rows = lambda: jnp.asarray(rng.integers(0, 64, (1, 4, 33), dtype=np.int32))
        segments = jnp.asarray(np.repeat(np.arange(2, dtype=np.int32), [20, 13])[None, None].repeat(4, 1))
        batches = [(rows(), segments) for _ in range(STEPS)]
        alone, sweep_step = one_at_a_time(train_step, batches), Sweep.train_step
    sweep = Sweep(MODEL, RUNS)
    metrics = [sweep_step(sweep, *batch) for batch in batches]
    assert all(m.loss.shape == (len(RUNS),) for m in metrics)
    for k, (state, run_metrics) in enumerate(alone):
        assert_close(nnx.state(sweep.run(k)), state, f"run {k} state")
        for step, expected in enumerate(run_metrics):
            assert_close(jax.tree.map(lambda x: x[k], metrics[step]), expected, f"run {k} step {step} metrics")
    losses = np.array([m.loss for m in metrics])
    assert not np.allclose(losses[:, 0], losses[:, 1]) and not np.allclose(losses[:, 0], losses[:, 2])  # runs differ


def test_a_sweep_refuses_runs_of_different_optimizers():
    with pytest.raises(ValueError, match=r"weight_decay differs: \[0.0, 0.1\]"):
        Sweep(MODEL, [TrainConfig(), TrainConfig(weight_decay=0.0)])
    with pytest.raises(ValueError, match="at least one"):
        Sweep(MODEL, [])
    with pytest.raises(ValueError, match="run 3 is not in this sweep of 3 runs"):
        Sweep(MODEL, RUNS).run(3)
