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
