"""experiments/needle.py: `--quick` writes its results, plot and table; the KV fractions, the
held-out seeds, the evaluation batches and the long-context copy of a HAM model are what they claim."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx

from hamjax.nn import LanguageModel

import experiment_scripts

needle = experiment_scripts.load("needle")

QUICK, FULL = needle.QUICK, needle.FULL


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return experiment_scripts.run_quick(needle, tmp_path_factory.mktemp("needle"))


def test_quick_run_writes_every_contender_at_every_length_and_a_plot(quick):
    path, record = quick
    assert path.with_suffix(".png").stat().st_size > 0
    assert record["quick"] is True and record["experiment"] == "needle"
    assert record["lengths"] == list(QUICK.lengths) == [96, 192]
    assert record["device"] and record["jax_version"] == jax.__version__ and record["seconds"] > 0
    assert [run["name"] for run in record["contenders"]] == [m["name"] for m in needle.models(QUICK)]
    for run in record["contenders"]:
        assert run["config"]["vocab_size"] == 256 and run["steps"] == QUICK.steps == 4
        # eval_every 2 and the stage ends (steps 2 and 4), at the stage's length
        assert [(h["step"], h["length"]) for h in run["history"]] == [(2, 96), (4, 96)]
        assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["loss"]) for h in run["history"])
        at_96 = run["evaluations"][0]
        assert run["history"][-1]["accuracy"] == at_96["accuracy"]  # the same model on the same held-out rows
        assert run["history"][-1]["loss"] == pytest.approx(at_96["loss"])
        assert [e["length"] for e in run["evaluations"]] == record["lengths"]
        for e in run["evaluations"]:
            assert 0.0 <= e["accuracy"] <= 1.0 and e["rows"] == QUICK.eval_rows and e["seconds"] > 0
        assert 0 < run["train_seconds"] < run["seconds"]


def test_kv_fractions_per_layer(quick):
    _, record = quick
    runs = {run["name"]: run for run in record["contenders"]}
    for e in runs["Transformer"]["evaluations"]:
        assert e["kv_fraction_per_layer"] == [1.0] * QUICK.n_layers and e["ham_kv_fraction"] == []
    ham = runs["HAM 0.25"]
    assert len(ham["tau"]) == QUICK.n_layers
    assert ham["config"]["capacity"] == max(QUICK.train_lengths)  # room for the longest training rows
    for e in ham["evaluations"]:
        layers = e["kv_fraction_per_layer"]
        assert layers == pytest.approx(e["ham_kv_fraction"]) and len(layers) == QUICK.n_layers
        assert e["kv_fraction"] == pytest.approx(np.mean(layers)) and all(0.0 <= f <= 1.0 for f in layers)
    assert needle.model_config(FULL, "gdn", None).kv_fractions(8192, []) == [0.0] * FULL.n_layers


def test_held_out_seeds_are_never_training_seeds(quick):
    _, record = quick
    first, last = record["train_seeds"]
    assert (first, last) == (0, QUICK.steps - 1)
    for run in record["contenders"]:
        for e in run["evaluations"]:
            assert e["seeds"][0] == needle.EVAL_SEED > last
    for setting in (QUICK, FULL):
        for length in setting.lengths:
            seeds = needle.eval_seeds(setting, length)
            assert min(seeds) > setting.steps - 1 and len(set(seeds)) == len(seeds)
            per_call = needle.rows_per_call(setting.eval_rows, length, setting.eval_tokens)
            assert len(seeds) * per_call == setting.eval_rows


def test_training_rows_follow_the_stages_with_one_seed_per_step():
    rows = list(needle.training_rows(FULL))
    assert [step for step, _, _ in rows] == list(range(1, FULL.steps + 1))
    expected = [(length, batch) for length, batch, steps in FULL.stages for _ in range(steps)]
    assert [(length, batch) for _, length, batch in rows] == expected


def test_with_steps_shares_the_steps_among_the_stages_in_proportion():
    assert [n for _, _, n in FULL.with_steps(75).stages] == [50, 25]
    assert [(t, b) for t, b, _ in FULL.with_steps(75).stages] == [(t, b) for t, b, _ in FULL.stages]
    assert [n for _, _, n in FULL.with_steps(1).stages] == [1, 1]


def test_rows_per_call_divides_the_rows_within_the_token_budget():
    assert needle.rows_per_call(32, 128, 8192) == 32
    assert needle.rows_per_call(32, 1024, 8192) == 8
    assert needle.rows_per_call(32, 8192, 8192) == 1
    assert needle.rows_per_call(6, 100, 400) == 3  # 4 rows would fit, but do not divide 6
    assert needle.rows_per_call(4, 1000, 500) == 1  # one row over the budget still runs


def test_at_length_gives_ham_room_for_every_token_and_keeps_its_parameters_and_thresholds():
    config = needle.model_config(QUICK, "ham", 0.25)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    model.update_thresholds(np.full(QUICK.n_layers, 0.9))  # thresholds away from their initial value
    capacity = QUICK.stages[0][0]
    assert model.config.capacity == capacity and needle.at_length(model, capacity) is model
    long = needle.at_length(model, 4 * capacity)
    assert long.config.capacity == 4 * capacity and needle.at_length(long, 2 * capacity) is long
    assert [layer.capacity for layer in long.ham_layers] == [4 * capacity] * QUICK.n_layers
    np.testing.assert_array_equal(long.taus(), model.taus())
    for got, want in zip(jax.tree.leaves(nnx.state(long, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(got, want)
    transformer = LanguageModel(needle.model_config(QUICK, "attention", None), rngs=nnx.Rngs(0))
    assert needle.at_length(transformer, 8192) is transformer  # attention has no capacity


def test_contenders_have_equal_width():
    configs = [needle.model_config(FULL, m["pattern"], m["kv_target"]) for m in needle.models(FULL)]
    shapes = {(c.d_model, c.n_layers, c.heads, c.key_dim, c.value_dim, c.vocab_size) for c in configs}
    assert len(shapes) == 1 and [c.mixers[0] for c in configs] == ["attention", "gdn", "ham"]


def test_summary_table(quick):
    _, record = quick
    table = needle.summary(record).splitlines()
    assert len(table) == 2 + len(record["contenders"])
    assert table[0].startswith("| model | T=96 (train) | T=192 |")
    (ham,) = [line for line in table if line.startswith("| HAM 0.25 |")]
    assert ham.count("(KV ") == len(record["lengths"])
    (transformer,) = [line for line in table if line.startswith("| Transformer |")]
    assert "(KV" not in transformer
