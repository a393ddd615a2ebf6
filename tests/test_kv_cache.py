"""hamjax.ops.kv_cache: appending a sequence == appending token by token == a list per (row, head);
capacity is respected; resizing round-trips; fixed shapes compile once (DESIGN.md §1.4)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hamjax import ops
from hamjax.ops import kv_cache as kv

B, H, K, V = 2, 3, 4, 5


def tokens(seed, steps, fraction=0.5, start=0):
    """Random tokens to append: keys [B, T, H, K], values [B, T, H, V], positions [B, T] (starting at
    `start`), scores and admitted [B, T, H] (about `fraction` admitted)."""
    rng = np.random.default_rng(seed)
    return dict(
        keys=rng.standard_normal((B, steps, H, K)).astype(np.float32),
        values=rng.standard_normal((B, steps, H, V)).astype(np.float32),
        positions=np.broadcast_to(start + np.arange(steps, dtype=np.int32), (B, steps)),
        scores=rng.random((B, steps, H)).astype(np.float32),
        admitted=rng.random((B, steps, H)) < fraction,
    )


def list_reference(capacity, *batches):
    """Entries per (row, head) as Python lists: each batch's admitted tokens in order, the first
    `capacity` kept. Returns {(b, h): [(key, value, position, score), ...]}."""
    entries = {(b, h): [] for b in range(B) for h in range(H)}
    for x in batches:
        for b, h in entries:
            for t in range(x["keys"].shape[1]):
                if x["admitted"][b, t, h] and len(entries[b, h]) < capacity:
                    entries[b, h].append(
                        (x["keys"][b, t, h], x["values"][b, t, h], x["positions"][b, t], x["scores"][b, t, h]))
    return entries


def assert_cache_holds(cache, entries):
    """`cache` holds exactly `entries` in its first slots; the other slots are empty (zeros, -1)."""
    capacity = cache.capacity
    occupied = np.asarray(cache.occupied)
    cache = jax.device_get(cache)
    for (b, h), rows in entries.items():
        n = len(rows)
        assert int(cache.count[b, h]) == n, f"count[{b}, {h}] = {int(cache.count[b, h])}, expected {n}"
        np.testing.assert_array_equal(occupied[b, h], np.arange(capacity) < n)
        for field, i in (("keys", 0), ("values", 1), ("positions", 2), ("scores", 3)):
            got = getattr(cache, field)[b, h]
            want = np.array([row[i] for row in rows]).reshape((n,) + got.shape[1:])
            np.testing.assert_array_equal(got[:n], want, err_msg=f"{field}[{b}, {h}]")
            empty = -1 if field == "positions" else 0
            assert np.all(got[n:] == empty), f"{field}[{b}, {h}]: slots past count are not empty"


append = jax.jit(kv.append_tokens)


@pytest.mark.parametrize("capacity", [0, 1, 6, 40])
def test_append_sequence_equals_token_by_token_and_list_reference(capacity):
    """Two appends (10 then 23 tokens) as sequences, and the same 33 tokens one at a time: identical
    caches, equal to a list per (row, head) that keeps the first `capacity` admitted tokens."""
    first, second = tokens(0, 10), tokens(1, 23, start=10)
    empty = ops.init_kv_cache(B, H, capacity, K, V)
    by_sequence = append(append(empty, **first), **second)
    by_token = empty
    for x in (first, second):
        for t in range(x["keys"].shape[1]):
            by_token = append(by_token, **{name: a[:, t : t + 1] for name, a in x.items()})
    chex.assert_trees_all_equal(by_sequence, by_token)
    assert_cache_holds(by_sequence, list_reference(capacity, first, second))
    if capacity == 6:  # overflow is exercised: more admitted than fit in every (row, head)
        admitted = first["admitted"].sum(1) + second["admitted"].sum(1)
        assert (admitted > capacity).all()


def test_full_cache_ignores_further_appends():
    cache = append(ops.init_kv_cache(B, H, 4, K, V), **tokens(2, 20, fraction=1.0))
    np.testing.assert_array_equal(cache.count, np.full((B, H), 4))
    again = append(cache, **tokens(3, 5, fraction=1.0, start=20))
    chex.assert_trees_all_equal(again, cache)


def test_append_keeps_dtype_and_shapes():
    cache = ops.init_kv_cache(B, H, 7, K, V, dtype=jnp.bfloat16)
    new = append(cache, **tokens(4, 9))
    chex.assert_trees_all_equal_shapes_and_dtypes(new, cache)
    chex.assert_type([new.keys, new.values], jnp.bfloat16)


def test_append_compiles_once_as_the_cache_fills():
    """One token at a time, past capacity: the same compiled function every time."""
    step = jax.jit(chex.assert_max_traces(kv.append_tokens, n=1))
    x = tokens(5, 9, fraction=1.0)
    cache = ops.init_kv_cache(B, H, 5, K, V)
    for t in range(9):
        names = ("keys", "values", "positions", "scores", "admitted")
        cache = step(cache, *(x[name][:, t : t + 1] for name in names))
        np.testing.assert_array_equal(cache.count, np.full((B, H), min(t + 1, 5)))


@pytest.mark.parametrize("capacity", [0, 3, 8])
def test_resize_round_trip(capacity):
    """Growing and shrinking back gives the same cache; shrinking keeps the first entries and clips
    the count; growing pads with empty slots."""
    cache = append(ops.init_kv_cache(B, H, 8, K, V), **tokens(6, 15))
    counts = np.asarray(cache.count)
    assert counts.min() < 8 and counts.max() >= 3, "need partly filled heads on both sides of the cut"
    grown = kv.resize(cache, 13)
    assert grown.capacity == 13
    chex.assert_trees_all_equal(kv.resize(grown, 8), cache)
    np.testing.assert_array_equal(grown.positions[:, :, 8:], -1)
    np.testing.assert_array_equal(grown.count, cache.count)
    small = kv.resize(cache, capacity)
    assert small.capacity == capacity
    np.testing.assert_array_equal(small.count, np.minimum(counts, capacity))
    for field in ("keys", "values", "positions", "scores"):
        np.testing.assert_array_equal(getattr(small, field), getattr(cache, field)[:, :, :capacity])
    # Appending to the grown cache puts new entries right after the old ones.
    more = tokens(7, 4, fraction=1.0, start=15)
    np.testing.assert_array_equal(append(grown, **more).count, counts + 4)


@pytest.mark.parametrize("call", [
    lambda: ops.init_kv_cache(B, H, -1, K, V),
    lambda: ops.init_kv_cache(B, H, 2.0, K, V),
    lambda: kv.resize(ops.init_kv_cache(B, H, 4, K, V), -3),
], ids=["init_negative", "init_float", "resize_negative"])
def test_bad_capacity_raises(call):
    with pytest.raises(ValueError, match=r"^capacity\b"):
        call()


@pytest.mark.parametrize("field, wrong, name", [
    ("keys", (B, H + 1, 4, K), "cache.keys"),
    ("keys", (B, H, 4, K + 2), "cache.keys"),
    ("values", (B, H, 4, V - 1), "cache.values"),
    ("positions", (B, H, 3), "cache.positions"),
    ("count", (B,), "cache.count"),
], ids=["keys_heads", "keys_key_dim", "values_value_dim", "positions_capacity", "count_rank"])
def test_check_cache_names_the_bad_field(field, wrong, name):
    cache = ops.init_kv_cache(B, H, 4, K, V)
    kv.check_cache(cache, B, H, K, V)  # the unmodified cache fits
    bad = cache._replace(**{field: jnp.zeros(wrong, getattr(cache, field).dtype)})
    with pytest.raises(ValueError, match=rf"^{name}\b.*{tuple(wrong)}".replace("(", r"\(").replace(")", r"\)")):
        kv.check_cache(bad, B, H, K, V)


def test_clear_rows_empties_only_the_chosen_rows():
    cache = ops.init_kv_cache(3, 2, 4, 5, 6)
    ones = lambda *s: np.ones(s, np.float32)
    cache = ops.append_tokens(cache, ones(3, 3, 2, 5), ones(3, 3, 2, 6), np.tile(np.arange(3), (3, 1)),
                              ones(3, 3, 2), np.ones((3, 3, 2), bool))
    cleared = kv.clear_rows(cache, jnp.array([False, True, False]))
    empty = ops.init_kv_cache(1, 2, 4, 5, 6)
    for got, full, fresh in zip(cleared, cache, empty):
        np.testing.assert_array_equal(got[1], fresh[0])
        np.testing.assert_array_equal(got[::2], full[::2])


# ------------------------------------------------------------------------------ insert_evicting

insert = jax.jit(kv.insert_evicting)


def stream(seed, steps, batch=2, heads=2, ties=False, fraction=0.6):
    """One token per step: keys [T, B, H, K], values [T, B, H, V], scores and candidate [T, B, H].
    ties: scores from 6 values (k / 8), so equal scores are common; else normal (some negative)."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, (steps, batch, heads)) / 8 if ties else rng.standard_normal((steps, batch, heads))
    return dict(
        keys=rng.standard_normal((steps, batch, heads, K)).astype(np.float32),
        values=rng.standard_normal((steps, batch, heads, V)).astype(np.float32),
        scores=scores.astype(np.float32),
        candidate=rng.random((steps, batch, heads)) < fraction,
    )


def held(cache, b, h):
    """{position: (score, key, value)} of the occupied slots of (b, h); positions must be unique."""
    n = int(cache.count[b, h])
    entries = {int(cache.positions[b, h, i]): (float(cache.scores[b, h, i]), cache.keys[b, h, i],
                                               cache.values[b, h, i]) for i in range(n)}
    assert len(entries) == n, f"({b}, {h}): a position is held twice: {cache.positions[b, h, :n]}"
    return entries


@pytest.mark.parametrize("capacity", [3, 4])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct_scores", "tied_scores"])
def test_insert_evicting_matches_a_list_oracle_after_every_token(capacity, ties):
    """60 tokens (B=2, H=2), one at a time. Oracle per (row, head): {position: score}; a candidate
    enters while there is room; when full it replaces a minimum-score entry iff its score is strictly
    higher (with tied minima, whichever the cache evicted, as long as it had the minimum score).
    After every token: admitted, count <= capacity, held (position, score) set, and each slot's
    key/value/score equal to what was inserted at its position; empty slots stay empty. At the end
    the held scores are the `capacity` largest among all candidates'."""
    b_, h_, steps = 2, 2, 60
    x = stream(100 + capacity + 10 * ties, steps, b_, h_, ties=ties)
    cache = ops.init_kv_cache(b_, h_, capacity, K, V)
    oracle = {(b, h): {} for b in range(b_) for h in range(h_)}
    evictions = rejections = equal_rejections = 0
    for t in range(steps):
        cache, admitted = insert(cache, x["keys"][t], x["values"][t], np.full(b_, t, np.int32), x["scores"][t],
                                 x["candidate"][t])
        assert admitted.shape == (b_, h_) and admitted.dtype == jnp.bool_
        cache, admitted = jax.device_get((cache, admitted))
        for (b, h), entries in oracle.items():
            score, where = float(x["scores"][t, b, h]), f"token {t}, ({b}, {h})"
            now = held(cache, b, h)
            expect = False
            if x["candidate"][t, b, h]:
                if len(entries) < capacity:
                    expect = True
                else:
                    weakest = min(entries.values())
                    expect = score > weakest
                    if expect:
                        gone = set(entries) - set(now)
                        assert len(gone) == 1, f"{where}: evicted {gone}"
                        (p,) = gone
                        assert entries[p] == weakest, f"{where}: evicted position {p} (score {entries[p]}), " \
                                                      f"not a minimum ({weakest})"
                        del entries[p]
                        evictions += 1
                    else:
                        rejections += 1
                        equal_rejections += score == weakest
                if expect:
                    entries[t] = score
            assert bool(admitted[b, h]) == expect, f"{where}: admitted {admitted[b, h]}, oracle {expect}"
            assert int(cache.count[b, h]) == len(entries) <= capacity
            assert {p: s for p, (s, _, _) in now.items()} == entries, f"{where}: cache {now.keys()} vs {entries}"
            for p, (s, key, value) in now.items():
                np.testing.assert_array_equal(key, x["keys"][p, b, h], err_msg=f"{where}: key of position {p}")
                np.testing.assert_array_equal(value, x["values"][p, b, h], err_msg=f"{where}: value of {p}")
                assert x["candidate"][p, b, h], f"{where}: non-candidate {p} entered"
            n = len(entries)
            assert np.all(cache.positions[b, h, n:] == -1) and not cache.keys[b, h, n:].any()
    assert evictions > 5 and rejections > 5, (evictions, rejections)
    for (b, h), entries in oracle.items():
        candidate_scores = np.sort(x["scores"][x["candidate"][:, b, h], b, h])
        np.testing.assert_array_equal(np.sort(list(entries.values())), candidate_scores[-capacity:])
    if ties:  # candidates equal to the weakest entry were turned away
        assert equal_rejections > 0


def test_insert_evicting_ignores_non_candidates_and_equal_scores():
    """A full cache of scores (1, 2, 3): a non-candidate with score 100 changes nothing; a candidate
    with score 1 (== the minimum) is not admitted; one with 1.5 replaces the entry with score 1."""
    cache = ops.init_kv_cache(1, 1, 3, K, V)
    ones = lambda *s: np.ones(s, np.float32)  # noqa: E731
    for t, s in enumerate((2.0, 1.0, 3.0)):
        cache, _ = insert(cache, t * ones(1, 1, K), t * ones(1, 1, V), np.array([t]), np.array([[s]], np.float32),
                          np.array([[True]]))
    full = cache
    for score, candidate in ((100.0, False), (1.0, True), (0.5, True)):
        new, admitted = insert(full, 9 * ones(1, 1, K), 9 * ones(1, 1, V), np.array([9]),
                               np.array([[score]], np.float32), np.array([[candidate]]))
        assert not bool(admitted[0, 0])
        chex.assert_trees_all_equal(new, full)
    new, admitted = insert(full, 9 * ones(1, 1, K), 9 * ones(1, 1, V), np.array([9]), np.array([[1.5]], np.float32),
                           np.array([[True]]))
    assert bool(admitted[0, 0])
    assert sorted(np.asarray(new.positions[0, 0]).tolist()) == [0, 2, 9]
    assert sorted(np.asarray(new.scores[0, 0]).tolist()) == [1.5, 2.0, 3.0]
    np.testing.assert_array_equal(new.count, [[3]])
    slot = int(np.flatnonzero(np.asarray(new.positions[0, 0]) == 9)[0])
    np.testing.assert_array_equal(new.keys[0, 0, slot], 9 * ones(K))
    np.testing.assert_array_equal(new.values[0, 0, slot], 9 * ones(V))


def test_insert_evicting_into_a_cache_with_room_equals_append_tokens():
    """Caches partly filled to different counts per (row, head) (some empty), capacity 8: inserting
    one token, for 5 tokens in a row, gives exactly append_tokens' cache with T = 1 and
    admitted = candidate, and admitted == candidate."""
    capacity = 8
    cache = append(ops.init_kv_cache(B, H, capacity, K, V), **tokens(40, 4, fraction=0.5))
    counts = np.asarray(cache.count)
    assert counts.min() == 0 < counts.max(), counts
    x = stream(41, 5, B, H, fraction=0.7)
    for t in range(5):
        assert (np.asarray(cache.count) < capacity).all()
        position = np.full(B, 4 + t, np.int32)
        new, admitted = insert(cache, x["keys"][t], x["values"][t], position, x["scores"][t], x["candidate"][t])
        expected = append(cache, x["keys"][t][:, None], x["values"][t][:, None], position[:, None],
                          x["scores"][t][:, None], x["candidate"][t][:, None])
        np.testing.assert_array_equal(admitted, x["candidate"][t])
        chex.assert_trees_all_equal(new, expected)
        cache = new
    assert (np.asarray(cache.count) > counts).any()


def test_insert_evicting_into_a_zero_capacity_cache_admits_nothing():
    cache = kv.init_kv_cache(1, 2, 0, 2, 3)
    new, admitted = kv.insert_evicting(
        cache, jnp.ones((1, 2, 2)), jnp.ones((1, 2, 3)), jnp.array([0]), jnp.ones((1, 2)), jnp.ones((1, 2), bool)
    )
    assert not np.any(admitted)
    np.testing.assert_array_equal(new.count, 0)
