"""hamjax.generate.sampling: greedy == argmax; filter_logits keeps exactly the top-k / top-p set of a
float64 NumPy oracle and scales by the temperature; sampled frequencies match the oracle's softmax;
keys make draws reproducible; bad configs raise ValueError naming the value."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hamjax.generate.sampling import SamplingConfig, filter_logits, sample

filter_jit = jax.jit(filter_logits, static_argnums=1)
sample_jit = jax.jit(sample, static_argnums=2)


def kept_reference(logits, temperature=1.0, top_k=None, top_p=None):
    """float64 oracle: (kept [B, V] bool, scaled logits [B, V], margin). Tokens ranked by descending
    logit (ties: lower id first); the first top_k kept; then, on the softmax of the kept (scaled)
    logits, token i of the ranking is kept while the probability of the tokens ranked before it is
    < top_p. margin: the smallest |mass before - top_p| over the candidates (how far the top-p
    decisions are from flipping under rounding)."""
    scaled = np.asarray(logits, np.float64) / (temperature or 1.0)
    batch, vocab = scaled.shape
    kept = np.zeros((batch, vocab), bool)
    margin = np.inf
    for b in range(batch):
        order = sorted(range(vocab), key=lambda i: (-scaled[b, i], i))
        order = order[: top_k if top_k is not None else vocab]
        if top_p is not None and top_p < 1.0:
            z = scaled[b, order]
            probs = np.exp(z - z.max())
            probs /= probs.sum()
            chosen, before = [], 0.0
            for i, p in zip(order, probs):
                margin = min(margin, abs(before - top_p))
                if before >= top_p:
                    break
                chosen.append(i)
                before += p
            order = chosen
        kept[b, order] = True
    return kept, scaled, margin


def oracle_probs(logits, **config):
    """Softmax of the oracle's filtered (scaled) logits, float64 [B, V]."""
    kept, scaled, _ = kept_reference(logits, **config)
    z = np.where(kept, scaled, -np.inf)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True), kept


def random_logits(seed, batch=6, vocab=23, scale=2.0):
    return (scale * np.random.default_rng(seed).standard_normal((batch, vocab))).astype(np.float32)


# ------------------------------------------------------------------------------------------ greedy


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = random_logits(0, batch=8, vocab=17)
    logits[1, [3, 9]] = logits[1].max() + 1.0  # a tie for the maximum: id 3 wins
    logits[2, :] = 0.5  # all equal: id 0
    logits[3, [16, 5, 11]] = 100.0  # id 5 wins
    logits[4, 0] = -np.inf
    config = SamplingConfig()
    assert config.greedy
    expected = np.argmax(logits, axis=-1)
    assert list(expected[1:4]) == [3, 0, 5]
    for key in (jax.random.key(0), jax.random.key(1)):  # the key is irrelevant
        tokens = sample_jit(logits, key, config)
        assert tokens.dtype == jnp.int32
        np.testing.assert_array_equal(tokens, expected)
    # Filters do not change greedy decoding.
    np.testing.assert_array_equal(sample_jit(logits, jax.random.key(2), SamplingConfig(0.0, 3, 0.5)), expected)


def test_top_k_1_sampling_is_greedy_even_with_ties():
    """top_k=1 keeps the argmax (lowest id among ties), so every draw equals greedy decoding."""
    logits = random_logits(1, batch=5, vocab=9)
    logits[0, [2, 7]] = 10.0
    logits[1, :] = -1.0
    config = SamplingConfig(temperature=1.3, top_k=1)
    for seed in range(3):
        np.testing.assert_array_equal(sample_jit(logits, jax.random.key(seed), config), np.argmax(logits, -1))
    kept = np.isfinite(np.asarray(filter_jit(logits, config)))
    np.testing.assert_array_equal(kept, np.eye(9, dtype=bool)[np.argmax(logits, -1)])


# -------------------------------------------------------------------------------------- filtering

FILTER_CONFIGS = [
    # (temperature, top_k, top_p)
    (1.0, None, None),
    (0.7, None, None),
    (1.0, 1, None),
    (1.0, 3, None),
    (2.5, 10, None),
    (1.0, None, 0.3),
    (1.0, None, 0.75),
    (0.5, None, 0.9),
    (3.0, None, 0.95),
    (1.0, 5, 0.5),
    (0.8, 4, 0.9),
    (1.7, 12, 0.6),
]


@pytest.mark.parametrize("temperature, top_k, top_p", FILTER_CONFIGS)
def test_filter_logits_matches_oracle(temperature, top_k, top_p):
    """Kept set == the oracle's; kept logits == logits / temperature; the rest -inf (float32 [B, V])."""
    logits = random_logits(10)
    kept, scaled, margin = kept_reference(logits, temperature, top_k, top_p)
    assert margin > 1e-4, f"test setup: a top-p decision is within {margin:.1e} of flipping"
    out = filter_jit(logits, SamplingConfig(temperature, top_k, top_p))
    assert out.shape == logits.shape and out.dtype == jnp.float32
    out = np.asarray(out)
    np.testing.assert_array_equal(np.isfinite(out), kept)
    assert np.all(out[~kept] == -np.inf)
    np.testing.assert_allclose(out[kept], scaled[kept], rtol=1e-6)
    if top_k is not None and top_p is None:
        np.testing.assert_array_equal(kept.sum(-1), min(top_k, logits.shape[1]))
    if top_p is not None:  # the filter is not trivial in these cases
        assert (kept.sum(-1) < min(top_k or logits.shape[1], logits.shape[1])).any()
    if top_k is not None:
        assert (kept.sum(-1) <= top_k).all()


def test_top_p_applies_after_top_k_on_the_renormalised_distribution():
    """probs (0.4, 0.3, 0.2, 0.1): top_p = 0.75 alone keeps 3 tokens (0.4 + 0.3 < 0.75); after top_k=2
    the distribution is (4/7, 3/7), and 4/7 < 0.75 keeps both; top_p = 0.5 keeps one after top_k=2
    (4/7 >= 0.5) but two without it (0.4 < 0.5)."""
    logits = np.log(np.array([[0.1, 0.4, 0.2, 0.3]], np.float32))
    kept = lambda **c: np.isfinite(np.asarray(filter_jit(logits, SamplingConfig(1.0, **c))))[0]  # noqa: E731
    np.testing.assert_array_equal(kept(top_p=0.75), [False, True, True, True])
    np.testing.assert_array_equal(kept(top_k=2, top_p=0.75), [False, True, False, True])
    np.testing.assert_array_equal(kept(top_p=0.5), [False, True, False, True])
    np.testing.assert_array_equal(kept(top_k=2, top_p=0.5), [False, True, False, False])
    for config in (dict(top_p=0.75), dict(top_k=2, top_p=0.75), dict(top_p=0.5), dict(top_k=2, top_p=0.5)):
        np.testing.assert_array_equal(kept(**config), kept_reference(logits, 1.0, **config)[0][0])


@pytest.mark.parametrize("top_p, count", [(0.125, 1), (0.25, 2), (0.375, 3), (0.375 + 2**-20, 4), (0.5, 4),
                                          (0.9, 8)])
def test_top_p_boundary_is_exclusive(top_p, count):
    """Eight equal logits: every probability is exactly 1/8 in float32, ranked by id. A token is kept
    iff the mass ranked before it is < top_p (strictly): the smallest set of the lowest ids whose
    mass reaches top_p, so top_p = m/8 keeps exactly m tokens."""
    logits = np.zeros((2, 8), np.float32)
    logits[1] = 3.0
    out = np.asarray(filter_jit(logits, SamplingConfig(1.0, top_p=top_p)))
    np.testing.assert_array_equal(np.isfinite(out), np.broadcast_to(np.arange(8) < count, (2, 8)))
    np.testing.assert_array_equal(np.isfinite(out), kept_reference(logits, top_p=top_p)[0])


def test_top_p_uses_the_temperature_scaled_distribution():
    """A low temperature sharpens the distribution, so the same top_p keeps fewer tokens."""
    logits = np.log(np.array([[0.35, 0.3, 0.2, 0.15]], np.float32))
    for temperature, count in ((1.0, 3), (0.25, 2), (0.05, 1)):
        out = np.asarray(filter_jit(logits, SamplingConfig(temperature, top_p=0.7)))
        kept, _, margin = kept_reference(logits, temperature, top_p=0.7)
        assert margin > 1e-3 and kept.sum() == count
        np.testing.assert_array_equal(np.isfinite(out), kept)


@pytest.mark.parametrize("config", [
    SamplingConfig(1.0, top_k=23), SamplingConfig(1.0, top_k=40), SamplingConfig(0.6, top_p=1.0),
    SamplingConfig(1.0, top_k=23, top_p=1.0), SamplingConfig(2.0), SamplingConfig(1.0, top_p=0.999999, top_k=1000),
], ids=["top_k_eq_V", "top_k_gt_V", "top_p_1", "both_trivial", "temperature_only", "top_p_near_1_keeps_all"])
def test_trivial_filters_keep_every_token(config):
    logits = random_logits(11, vocab=23, scale=1.0)  # no token below ~1e-6 of the mass
    out = np.asarray(filter_jit(logits, config))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, logits.astype(np.float64) / config.temperature, rtol=1e-6)


@pytest.mark.parametrize("top_k", [None, 1, 7])
def test_tiny_top_p_keeps_exactly_the_argmax(top_k):
    logits = random_logits(12, batch=7, vocab=15)
    logits[0, [4, 8]] = logits[0].max() + 2.0  # tie for the maximum: the lower id is kept
    out = np.asarray(filter_jit(logits, SamplingConfig(0.9, top_k, top_p=1e-9)))
    np.testing.assert_array_equal(np.isfinite(out), np.eye(15, dtype=bool)[np.argmax(logits, -1)])
    assert np.argmax(logits[0]) == 4


# --------------------------------------------------------------------------------------- sampling

N_DRAWS = 20_000


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 6, 0.85), (1.5, None, 0.7)])
def test_sampled_frequencies_match_the_oracle(temperature, top_k, top_p):
    """N_DRAWS rows of the same logits with one key: every draw is in the kept set, and each token's
    frequency is within 5 standard errors of its oracle probability (and a chi-square test passes)."""
    logits = random_logits(20, batch=1, vocab=10, scale=1.2)
    probs, kept = oracle_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    probs, kept = probs[0], kept[0]
    assert kept_reference(logits, temperature, top_k, top_p)[2] > 1e-4
    if top_k or top_p:
        assert 1 < kept.sum() < 10, "the filter must drop some tokens but keep a choice"
    config = SamplingConfig(temperature, top_k, top_p)
    tokens = np.asarray(sample_jit(np.repeat(logits, N_DRAWS, axis=0), jax.random.key(123), config))
    assert tokens.shape == (N_DRAWS,) and tokens.dtype == np.int32
    assert kept[tokens].all(), f"drawn outside the kept set: {np.unique(tokens[~kept[tokens]])}"
    freq = np.bincount(tokens, minlength=10) / N_DRAWS
    bound = 5 * np.sqrt(probs * (1 - probs) / N_DRAWS)
    assert (np.abs(freq - probs) <= bound).all(), f"frequencies {freq}\noracle {probs}"
    counts, expected = freq[kept] * N_DRAWS, probs[kept] * N_DRAWS
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    dof = int(kept.sum()) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), f"chi-square {chi2:.1f} with {dof} degrees of freedom"


def test_sampling_with_vmapped_keys_matches_the_oracle():
    """The same check through jax.vmap over N_DRAWS keys (one row each)."""
    logits = random_logits(21, batch=1, vocab=6, scale=1.0)
    config = SamplingConfig(0.8, top_k=4)
    probs, kept = (x[0] for x in oracle_probs(logits, temperature=0.8, top_k=4))
    keys = jax.random.split(jax.random.key(7), N_DRAWS)
    tokens = np.asarray(jax.jit(jax.vmap(lambda k: sample(logits, k, config)[0]))(keys))
    assert kept[tokens].all()
    freq = np.bincount(tokens, minlength=6) / N_DRAWS
    assert (np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / N_DRAWS)).all(), f"{freq} vs {probs}"


def test_same_key_same_tokens_different_keys_different_tokens():
    """64 rows over 16 nearly uniform tokens: two keys give the same 64 draws with probability
    ~16^-64; the same key always gives the same draws."""
    logits = random_logits(30, batch=64, vocab=16, scale=0.1)
    config = SamplingConfig(1.0, top_k=12, top_p=0.95)
    first = np.asarray(sample_jit(logits, jax.random.key(5), config))
    np.testing.assert_array_equal(sample_jit(logits, jax.random.key(5), config), first)
    for seed in (6, 7):
        other = np.asarray(sample_jit(logits, jax.random.key(seed), config))
        assert (other != first).any()
    # Draws are spread over the kept tokens, not collapsed onto one.
    assert len(np.unique(first)) > 5


# ------------------------------------------------------------------------------------ bad configs


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("temperature", -1e-9), ("temperature", float("nan")),
    ("temperature", float("inf")), ("temperature", float("-inf")),
    ("top_k", 0), ("top_k", -1), ("top_k", 2.5),
    ("top_p", 0), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", float("nan")),
])
def test_invalid_config_raises_value_error_naming_the_value(field, value):
    with pytest.raises(ValueError, match=rf"^{field}\b.*{re.escape(repr(value))}\W*$"):
        SamplingConfig(**{field: value})


def test_valid_configs_do_not_raise():
    for kwargs in (dict(), dict(temperature=0), dict(temperature=2), dict(top_k=1), dict(top_p=1.0),
                   dict(top_p=1e-9), dict(temperature=0.5, top_k=50, top_p=0.9)):
        SamplingConfig(**kwargs)
