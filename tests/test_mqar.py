"""MQAR (DESIGN.md §5): every row checked against the definition, the power-law slot distribution
against its probabilities, the fillers against a uniform draw, the config checks, and the metric."""

from __future__ import annotations

import numpy as np
import pytest

from hamjax.data import IGNORE_INDEX, MQARConfig, mqar_batch, recall_accuracy

ZOOLOGY_SETTINGS = [(64, 4), (128, 8), (256, 16), (512, 64)]


@pytest.mark.parametrize(
    "config",
    [MQARConfig(seq_len=t, num_pairs=n) for t, n in ZOOLOGY_SETTINGS]
    + [MQARConfig(vocab_size=40, seq_len=64, num_pairs=16), MQARConfig(vocab_size=34, seq_len=69, num_pairs=16)],
    ids=lambda c: f"V{c.vocab_size}-T{c.seq_len}-N{c.num_pairs}",
)
def test_rows_follow_the_definition(config):
    v, t, n = config.vocab_size, config.seq_len, config.num_pairs
    inputs, targets = mqar_batch(config, batch_size=8, seed=3)
    assert inputs.shape == targets.shape == (8, t) and inputs.dtype == targets.dtype == np.int32
    assert inputs.min() >= 0 and inputs.max() < v
    for row, target in zip(inputs, targets):
        keys, values = row[0 : 2 * n : 2], row[1 : 2 * n : 2]
        assert len(set(keys)) == n and len(set(values)) == n
        assert keys.min() >= 1 and keys.max() < v // 2 and values.min() >= v // 2
        assert (target[: 2 * n] == IGNORE_INDEX).all()
        scored = np.flatnonzero(target != IGNORE_INDEX)
        assert len(scored) == n and ((scored - 2 * n) % 2 == 0).all()
        for key, value in zip(keys, values):
            (occurrences,) = np.nonzero(row[2 * n :] == key)
            assert len(occurrences) == 1  # its query, and nowhere else after the pairs
            query = 2 * n + occurrences[0]
            assert query in scored and target[query] == value


def test_batches_are_deterministic_per_seed():
    config = MQARConfig(seq_len=128, num_pairs=8)
    first, again, other = (mqar_batch(config, 4, seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert (first[0] != other[0]).mean() > 0.9
    assert (first[1] != other[1]).any()


def _slots(config: MQARConfig, batch_size: int, seed: int) -> np.ndarray:
    """[B, N] slot of the query of the key of each pair, in pair order (the definition test checks that
    a key occurs once after the pairs, at a scored position)."""
    inputs, _ = mqar_batch(config, batch_size, seed)
    n = config.num_pairs
    keys = inputs[:, 0 : 2 * n : 2]
    return np.argmax(inputs[:, None, 2 * n :] == keys[:, :, None], axis=-1) // 2


def test_query_slots_follow_the_power_law():
    config = MQARConfig(vocab_size=64, seq_len=256, num_pairs=16)  # S = 112 slots
    p = config.slot_probabilities()
    assert p.shape == (112,) and np.isclose(p.sum(), 1) and (np.diff(p) < 0).all()
    slots = _slots(config, batch_size=10_000, seed=0)
    # The first pair's key takes the first draw: its slot is distributed as p itself (4 sigma).
    for g in range(4):
        frequency = (slots[:, 0] == g).mean()
        assert abs(frequency - p[g]) < 4 * np.sqrt(p[g] * (1 - p[g]) / len(slots)), (g, frequency, p[g])
    # The second pair's key takes the second draw, without replacement: slot 0 unless the first took it.
    second = p[0] * np.sum(np.delete(p / (1 - p), 0))
    frequency = (slots[:, 1] == 0).mean()
    assert abs(frequency - second) < 4 * np.sqrt(second * (1 - second) / len(slots)), (frequency, second)
    # Short gaps dominate: a uniform placement would put 1/4 of the queries in the first quarter.
    assert (slots < 112 // 4).mean() > 0.45
    assert np.median(slots[:, 0]) < np.median(slots[:, -1])  # earlier pairs are queried earlier


def test_power_a_one_places_queries_uniformly():
    slots = _slots(MQARConfig(vocab_size=64, seq_len=256, num_pairs=16, power_a=1.0), batch_size=500, seed=0)
    assert abs((slots < 112 // 4).mean() - 0.25) < 0.03
    assert abs(np.median(slots[:, 0]) - np.median(slots[:, -1])) < 10


def test_fillers_are_uniform_over_the_non_keys():
    config = MQARConfig(vocab_size=16, seq_len=64, num_pairs=4)
    inputs, targets = mqar_batch(config, batch_size=3000, seed=1)
    filler = np.ones(inputs.shape, bool)
    filler[:, : 2 * config.num_pairs] = False
    filler &= targets == IGNORE_INDEX
    counts = np.zeros(config.vocab_size)
    expected = np.zeros(config.vocab_size)
    for row, where in zip(inputs, filler):
        counts += np.bincount(row[where], minlength=config.vocab_size)
        allowed = np.setdiff1d(np.arange(config.vocab_size), row[0 : 2 * config.num_pairs : 2])
        expected[allowed] += where.sum() / len(allowed)
    np.testing.assert_allclose(counts, expected, rtol=0.03)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vocab_size=8191), "vocab_size must be even .* got 8191"),
        (dict(vocab_size=32, seq_len=64, num_pairs=16), "num_pairs=16 exceeds the 15 distinct keys"),
        (dict(seq_len=63, num_pairs=16), r"seq_len=63 is too short for num_pairs=16.*seq_len >= 4N = 64"),
        (dict(num_pairs=0), "num_pairs must be a positive integer, got 0"),
        (dict(power_a=0.0), "power_a must be a positive finite number, got 0.0"),
        (dict(seq_len=256.0), "seq_len must be a positive integer, got 256.0"),
    ],
)
def test_invalid_configs_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MQARConfig(**kwargs)


def test_mqar_batch_checks_its_arguments():
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        mqar_batch(MQARConfig(), 0, 0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        mqar_batch(MQARConfig(), 1, -1)


def test_recall_accuracy_scores_only_the_scored_positions():
    config = MQARConfig(vocab_size=64, seq_len=64, num_pairs=8)
    inputs, targets = mqar_batch(config, 4, seed=0)
    scored = targets != IGNORE_INDEX
    predictions = np.where(scored, targets, inputs)  # wrong or meaningless everywhere else
    assert recall_accuracy(predictions, targets) == 1.0
    predictions[np.nonzero(scored)[0][:3], np.nonzero(scored)[1][:3]] = 0  # three wrong of 32
    assert recall_accuracy(predictions, targets) == 29 / 32
    logits = np.eye(config.vocab_size)[predictions]  # [B, T, V]: argmax = predictions
    assert recall_accuracy(logits, targets) == 29 / 32
    with pytest.raises(ValueError, match=r"must match targets \[B, T\]"):
        recall_accuracy(predictions[:, :-1], targets)
    with pytest.raises(ValueError, match="no scored position"):
        recall_accuracy(predictions, np.full_like(targets, IGNORE_INDEX))
