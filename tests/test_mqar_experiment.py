"""experiments/mqar.py and the recall training step it uses (hamjax.train.recall_train_step,
recall_evaluate): `--quick` writes its results and plot; the step's loss, update and thresholds
equal slow, obviously correct computations.

The step tests use the quick run's Transformer and HAM configs and batch shapes (the quick run
trains them as sweeps, so the one-run steps compile here again)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hamjax.data import IGNORE_INDEX, MQARConfig, mqar_batch, recall_accuracy
from hamjax.nn import LanguageModel
from hamjax.train import make_optimizer, recall_evaluate, recall_train_step

import experiment_scripts

mqar = experiment_scripts.load("mqar")

QUICK = mqar.QUICK
SEQ_LEN, NUM_PAIRS = QUICK.tasks[1]
TASK = MQARConfig(vocab_size=QUICK.vocab_size, seq_len=SEQ_LEN, num_pairs=NUM_PAIRS)
LR = QUICK.learning_rates[0]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return experiment_scripts.run_quick(mqar, tmp_path_factory.mktemp("mqar"))


def test_quick_run_writes_every_seed_of_every_sweep_the_best_and_a_plot(quick):
    path, record = quick
    assert path.with_suffix(".png").stat().st_size > 0
    names = [m["name"] for m in mqar.models(QUICK)]
    assert record["quick"] is True and record["setting"]["tasks"] == [list(t) for t in QUICK.tasks]
    runs_per_sweep = len(QUICK.learning_rates) * len(QUICK.seeds)
    assert len(record["runs"]) == len(QUICK.tasks) * len(names) * runs_per_sweep
    for run in record["runs"]:
        assert run["model"] in names and 0.0 <= run["accuracy"] <= 1.0 and run["sweep_seconds"] > 0
        assert 1 <= run["steps"] <= QUICK.steps and run["history"][-1]["step"] == run["steps"]
        assert run["learning_rate"] in QUICK.learning_rates and run["seed"] in QUICK.seeds
        layers = run["kv_fraction_per_layer"]
        assert len(layers) == 2 and run["kv_fraction"] == pytest.approx(np.mean(layers))
        if run["pattern"] == "ham,ham":
            assert layers == pytest.approx(run["ham_kv_fraction"]) and len(run["tau"]) == 2
            assert all(0.0 <= f <= 1.0 for f in layers)
        else:
            assert run["ham_kv_fraction"] == [] and layers == [1.0, 1.0]  # the quick baseline: a Transformer
    # The seeds start from different parameters, so their held-out losses differ.
    first = [r for r in record["runs"] if r["model"] == "Transformer" and mqar.task_key(r) == QUICK.tasks[0]]
    assert len({r["eval_loss"] for r in first}) == len(QUICK.seeds)
    best = {(b["model"], b["task"]["seq_len"], b["task"]["num_pairs"]) for b in record["best"]}
    assert best == {(name, t, n) for name in names for t, n in QUICK.tasks}
    table = mqar.summary(record)
    assert len(table.splitlines()) == 2 + len(best) and "| HAM 0.25 |" in table


def test_best_runs_takes_the_learning_rate_with_the_best_mean_accuracy_over_seeds():
    def run(lr, seed, accuracy, loss):
        return dict(
            model="GDN", kv_target=None, task=dict(seq_len=64, num_pairs=8, vocab_size=64), learning_rate=lr,
            seed=seed, accuracy=accuracy, eval_loss=loss, kv_fraction=0.0, steps=10, solved_at=None,
            sweep_seconds=6.0,
        )
    runs = [run(1e-3, 0, 1.0, 0.1), run(1e-3, 1, 0.2, 3.0),  # mean 0.6: one seed solved
            run(1e-2, 0, 0.7, 1.0), run(1e-2, 1, 0.7, 1.2)]  # mean 0.7: none solved
    (best,) = mqar.best_runs(runs)
    assert best["learning_rate"] == 1e-2 and best["seeds"] == [0, 1] and best["solved"] == 0
    assert best["accuracy"] == pytest.approx(0.7) and best["accuracy_std"] == pytest.approx(0.0)
    assert best["eval_loss"] == pytest.approx(1.1) and best["sweep_seconds"] == 6.0
    (best,) = mqar.best_runs(runs[:2])
    assert best["solved"] == 1 and (best["accuracy_min"], best["accuracy_max"]) == (0.2, 1.0)
    assert best["accuracy_std"] == pytest.approx(0.4)


def test_a_second_run_trains_only_the_sweeps_its_results_file_lacks(quick, tmp_path, monkeypatch):
    path, record = quick
    first_task = [r for r in record["runs"] if mqar.task_key(r) == QUICK.tasks[0]]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(dict(record, runs=first_task)))
    trained = []

    def fake_sweep(spec, task, setting, bar):
        trained.append((spec["name"], task.seq_len, task.num_pairs))
        return [r for r in record["runs"] if r["model"] == spec["name"] and mqar.task_key(r) == (task.seq_len, task.num_pairs)]

    monkeypatch.setattr(mqar, "train_sweep", fake_sweep)
    resumed = mqar.main(["--quick", "--output", str(partial)])
    assert trained == [(m["name"], *QUICK.tasks[1]) for m in mqar.models(QUICK)]
    assert resumed["runs"] == record["runs"] and resumed["best"] == record["best"]
    assert json.loads(partial.read_text())["runs"] == record["runs"]  # saved as each sweep ended
    trained.clear()
    mqar.main(["--quick", "--output", str(partial)])
    assert trained == []


def test_a_results_file_of_another_setting_is_refused(quick):
    path, _ = quick
    with pytest.raises(SystemExit, match=r"another setting \(steps: 4 -> 3\)"):
        mqar.main(["--quick", "--steps", "3", "--output", str(path)])


def test_only_the_conv_baselines_put_a_convolution_before_attention():
    configs = {m["name"]: mqar.model_config(mqar.FULL, m["pattern"], m["kv_target"], 64, m["attention_conv"])
               for m in mqar.models(mqar.FULL)}
    assert [name for name, config in configs.items() if config.attention_conv] == ["Transformer + conv"]
    assert configs["Transformer + conv"] == dataclasses.replace(configs["Transformer"], attention_conv=True)


def test_a_task_is_given_as_length_and_pairs():
    assert mqar.parse_task("128:16") == (128, 16)
    with pytest.raises(Exception, match="a task is T:N"):
        mqar.parse_task("128x16")


def _setup(pattern: str, kv_target: float | None):
    """The quick run's model and optimizer for this pattern."""
    config = mqar.model_config(QUICK, pattern, kv_target, SEQ_LEN)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    return model, make_optimizer(model, mqar.train_config(QUICK, LR, 0))


def _batch(seed: int):
    inputs, targets = mqar_batch(TASK, QUICK.batch_size, seed)
    assert (targets == IGNORE_INDEX).any() and (targets != IGNORE_INDEX).any()
    return jnp.asarray(inputs), jnp.asarray(targets)


def _masked_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """float64 NumPy: the mean over scored positions of log sum exp(logits) - logits[target]."""
    b, t = np.nonzero(targets != IGNORE_INDEX)
    rows = logits[b, t].astype(np.float64)
    top = rows.max(axis=-1)
    log_z = top + np.log(np.exp(rows - top[:, None]).sum(axis=-1))
    return float(np.mean(log_z - rows[np.arange(len(b)), targets[b, t]]))


def test_recall_loss_and_evaluation_equal_numpy_on_the_logits():
    model, optimizer = _setup("attention,attention", None)
    inputs, targets = _batch(1)
    forward = nnx.jit(lambda model, inputs, segment_ids: model(inputs, segment_ids=segment_ids)[0])
    logits = np.asarray(forward(model, inputs, jnp.ones_like(inputs)))  # one document per row
    expected = _masked_cross_entropy(logits, np.asarray(targets))

    evaluation = recall_evaluate(model, inputs, targets)
    assert evaluation.loss == pytest.approx(expected, rel=1e-5)
    assert evaluation.accuracy == recall_accuracy(logits, targets) and evaluation.kv_fraction.shape == (0,)

    metrics = recall_train_step(model, optimizer, inputs, targets)  # the loss before its own update
    assert float(metrics.loss) == pytest.approx(expected, rel=1e-5)
    assert int(metrics.tokens) == QUICK.batch_size * NUM_PAIRS


def test_recall_update_equals_the_gradient_of_the_loss_over_the_scored_positions_only():
    model, optimizer = _setup("attention,attention", None)
    reference, reference_optimizer = _setup("attention,attention", None)
    inputs, targets = _batch(2)
    rows, cols = np.nonzero(np.asarray(targets) != IGNORE_INDEX)
    labels = np.asarray(targets)[rows, cols]
    graphdef, params, rest = nnx.split(reference, nnx.Param, ...)

    def scored_loss(params):  # gathers the scored positions: the others cannot enter it
        logits = nnx.merge(graphdef, params, rest)(inputs)[0][rows, cols]
        return -jnp.mean(jax.nn.log_softmax(logits)[np.arange(len(labels)), labels])

    grads = jax.jit(jax.grad(scored_loss))(params)
    nnx.jit(lambda optimizer, model, grads: optimizer.update(model, grads))(reference_optimizer, reference, grads)
    metrics = recall_train_step(model, optimizer, inputs, targets)

    assert float(metrics.grad_norm) == pytest.approx(float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))), rel=1e-4)
    for got, want in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(reference, nnx.Param))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_recall_step_moves_the_thresholds_as_the_controller_does_from_the_batch_kv_fraction():
    model, optimizer = _setup("ham,ham", 0.25)
    before, _ = _setup("ham,ham", 0.25)
    inputs, targets = _batch(3)
    measured = recall_evaluate(before, inputs, targets).kv_fraction  # the same parameters, before the update
    assert np.asarray(before.taus()) == pytest.approx(np.asarray(model.taus()))  # evaluation moves no threshold

    metrics = recall_train_step(model, optimizer, inputs, targets)
    np.testing.assert_allclose(metrics.kv_fraction, measured, rtol=1e-6)
    before.update_thresholds(jnp.asarray(measured))  # what train_step does after its update
    np.testing.assert_allclose(model.taus(), before.taus(), rtol=1e-6)
    np.testing.assert_allclose(metrics.tau, model.taus())
    assert not np.allclose(model.taus(), mqar.model_config(QUICK, "ham,ham", 0.25, SEQ_LEN).tau_init)
