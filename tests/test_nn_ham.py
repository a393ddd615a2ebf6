"""hamjax.nn.ham: the HAM layer (parallel form == decode steps, caches, padding, segments, routers,
threshold state, the tau = +inf limit).

Admission is a hard threshold, so parity tests first look at the routing scores of the run and put
tau midway in a wide gap between them (`set_tau_in_gap`): no decision can flip on rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hamjax import ops
from hamjax.nn import HAM, GatedDeltaNet, GDNCache, NoWeightDecay, Threshold
from layer_checks import assert_tree_close, call, call_steps, normal

B, T, D, H, K, V, W = 2, 20, 16, 2, 8, 6, 4
CAPACITY = 6  # about half of the T tokens pass tau: the cache overflows
SPLIT = 7  # prefix length; the suffix has T - SPLIT = 13 tokens
ROUTERS = ["surprise", "learned"]


def make(router="surprise", seed=0, **kwargs):
    kwargs = dict(capacity=CAPACITY, router=router, conv_width=W, chunk_size=8, rngs=nnx.Rngs(seed)) | kwargs
    return HAM(D, H, K, V, **kwargs)


@pytest.fixture(scope="module", params=ROUTERS)
def layer(request):
    return make(request.param)


@pytest.fixture(scope="module")
def x():
    return normal(1, (B, T, D))


def start_cache(layer, seed=2):
    """A cache as a previous call leaves it: nonzero RNN and conv state, KV entries, position 7."""
    return call(layer, normal(seed, (B, SPLIT, D)), layer.init_cache(B, T))[1]


def set_tau(layer, tau, step=0):
    layer.threshold.set_value(ops.ThresholdState(jnp.log(jnp.float32(tau)), jnp.int32(step)))


def set_tau_in_gap(layer, scores, quantiles=(0.25, 0.75)):
    """Put tau midway in the widest gap between the observed scores within the given quantiles."""
    s = np.unique(np.asarray(scores, np.float64))
    low, high = np.quantile(s, quantiles)
    middle = s[(s >= low) & (s <= high)]
    i = int(np.argmax(np.diff(middle)))
    assert middle[i + 1] - middle[i] > 2e-4, "no wide gap between scores: change the seed"
    set_tau(layer, (middle[i] + middle[i + 1]) / 2)
    return float(layer.tau)


def set_tau_for(layer, x, cache, **kwargs):
    """Set tau in a gap of the scores of `layer(x, ...)` (scores do not depend on tau)."""
    return set_tau_in_gap(layer, call(layer, x, cache, **kwargs)[2].scores)


def rows_from(first, second):
    """Row 0 of `first`, row 1 of `second`."""
    return jax.tree.map(lambda a, b: jnp.stack([a[0], b[1]]), first, second)


def empty_at(layer, position):
    cache = layer.init_cache(B, T)
    return cache._replace(ham=cache.ham._replace(position=jnp.asarray(position, jnp.int32)))


def without_position(cache):
    return cache._replace(ham=cache.ham._replace(position=None))


@nnx.jit
def loss_grads(layer, x):
    return nnx.grad(lambda model: jnp.mean(model(x)[0] ** 2))(layer)


# ------------------------------------------------------------------------------ initialisation


def test_initialisation():
    layer = make(threshold=ops.ThresholdConfig(initial_tau=0.25))
    np.testing.assert_allclose(jnp.exp(layer.log_logit_scale[...]), [math.sqrt(K)] * H, rtol=1e-6)
    np.testing.assert_array_equal(layer.gamma[...], 1.0)
    np.testing.assert_allclose(layer.tau, 0.25, rtol=1e-6)
    custom = make(logit_scale_init=30.0)
    np.testing.assert_allclose(jnp.exp(custom.log_logit_scale[...]), [30.0] * H, rtol=1e-6)
    assert not isinstance(layer.threshold, nnx.Param) and isinstance(layer.threshold, nnx.Variable)


@pytest.mark.parametrize("router", ROUTERS)
def test_parameter_count(router):
    hidden = 5
    layer = make(router, router_hidden=hidden)
    qkv = H * (2 * K + V)
    gdn = D * qkv + W * qkv + D * H * (V + 2) + 2 * H + V + H * V * D
    expected = gdn + V + 2 * H + (D * hidden + hidden + hidden * H + H if router == "learned" else 0)
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(layer, nnx.Param))) == expected


def test_no_weight_decay_parameters(layer):
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(layer, NoWeightDecay))}
    expected = {"proj.A_log", "proj.dt_bias", "norm.scale", "attn_norm.scale", "log_logit_scale", "gamma"}
    assert paths == expected


# ------------------------------------------------------------------------------ parity


def test_sequence_equals_step_loop(layer, x):
    cache = start_cache(layer)
    tau = set_tau_for(layer, x, cache)
    y, end, stats = call(layer, x, cache)
    y_steps, end_steps, step_outputs = call_steps(layer, x, cache)
    admitted_steps = jnp.concatenate([s.admitted for (s,) in step_outputs], axis=1)
    scores_steps = jnp.concatenate([s.scores for (s,) in step_outputs], axis=1)
    assert_tree_close((y, end, stats.admitted, stats.scores), (y_steps, end_steps, admitted_steps, scores_steps))
    # The case is not trivial: some tokens are admitted, and some pass tau but find the cache full.
    assert np.any(stats.admitted) and np.any((stats.scores > tau) & ~stats.admitted)
    assert np.any(end.ham.cache.count == CAPACITY)
    per_head = np.mean(np.asarray(stats.admitted), axis=(0, 1))
    np.testing.assert_allclose(stats.kv_fraction_per_head, per_head, rtol=1e-6)
    np.testing.assert_allclose(stats.kv_fraction, per_head.mean(), rtol=1e-6)


def test_prefix_cache_suffix_equals_one_pass(layer, x):
    cache = start_cache(layer)
    set_tau_for(layer, x, cache)
    y_prefix, mid, stats_prefix = call(layer, x[:, :SPLIT], cache)
    y_suffix, end, stats_suffix = call(layer, x[:, SPLIT:], mid)
    y, expected_end, stats = call(layer, x, cache)
    admitted = jnp.concatenate([stats_prefix.admitted, stats_suffix.admitted], axis=1)
    joined = (jnp.concatenate([y_prefix, y_suffix], axis=1), end, admitted)
    assert_tree_close(joined, (y, expected_end, stats.admitted))


def test_dense_attention_equals_compacted(x):
    """With the learned router, whose log-score bias the two paths add in different places."""
    layer = make("learned")
    dense = make("learned", seed=3, attention="dense")
    nnx.update(dense, nnx.state(layer))
    cache = start_cache(layer)
    set_tau_for(layer, x, cache)
    set_tau(dense, layer.tau)
    assert_tree_close(call(dense, x, cache), call(layer, x, cache))


def test_padding_leaves_state_unchanged(layer, x):
    """Trailing padding: same outputs, and the same RNN, conv and KV cache; only the position moves
    on (ops.ham_sequence counts every token of the call, padding included)."""
    cache = start_cache(layer)
    n = T - SPLIT
    set_tau_for(layer, x[:, :n], cache)
    valid = jnp.arange(T) < n
    y, end, stats = call(layer, x.at[:, n:].multiply(5.0), cache, valid=jnp.broadcast_to(valid, (B, T)))
    y_valid, expected_end, expected_stats = call(layer, x[:, :n], cache)
    assert_tree_close((y[:, :n], without_position(end)), (y_valid, without_position(expected_end)))
    assert_tree_close(stats.kv_fraction_per_head, expected_stats.kv_fraction_per_head)
    assert not np.any(stats.admitted[:, n:])
    _, step_end, _ = call(layer, x[:, :1], cache, valid=jnp.zeros((B, 1), bool))
    assert_tree_close(without_position(step_end), without_position(cache))


def test_segments_reset_state_conv_and_cache(x):
    """One pass over packed rows == each segment run on its own at its original positions (the
    first from the incoming cache, the others from an empty one). Row 0: SPLIT tokens then T - SPLIT;
    row 1 the other way round, so that the separate runs batch into two calls."""
    layer = make()
    cache = start_cache(layer)
    segment_ids = jnp.array([[3] * SPLIT + [4] * (T - SPLIT), [0] * (T - SPLIT) + [9] * SPLIT])
    set_tau_for(layer, x, cache, segment_ids=segment_ids)
    y, end, _ = call(layer, x, cache, segment_ids=segment_ids)
    position = cache.ham.position
    short_cache = rows_from(cache, empty_at(layer, position + T - SPLIT))
    long_cache = rows_from(empty_at(layer, position + SPLIT), cache)
    y_short, end_short, _ = call(layer, jnp.stack([x[0, :SPLIT], x[1, T - SPLIT :]]), short_cache)
    y_long, end_long, _ = call(layer, jnp.stack([x[0, SPLIT:], x[1, : T - SPLIT]]), long_cache)
    expected_y = jnp.stack(
        [jnp.concatenate([y_short[0], y_long[0]]), jnp.concatenate([y_long[1], y_short[1]])]
    )
    assert_tree_close((y, end), (expected_y, rows_from(end_long, end_short)))


@pytest.mark.parametrize("router", ROUTERS)
def test_infinite_tau_equals_gated_delta_net(router, x):
    """tau = +inf admits nothing, o_attn = 0 and RMSNorm(0) = 0: the layer is its GatedDeltaNet."""
    layer = make(router)
    layer.gamma[...] = jnp.full((H,), 2.0, jnp.float32)
    set_tau(layer, jnp.inf)
    gdn = GatedDeltaNet(D, H, K, V, conv_width=W, chunk_size=8, rngs=nnx.Rngs(7))
    nnx.update(gdn.proj, nnx.state(layer.proj))
    nnx.update(gdn.norm, nnx.state(layer.norm))
    y, end, stats = call(layer, x, layer.init_cache(B, T))
    y_gdn, end_gdn, _ = call(gdn, x, gdn.init_cache(B, T))
    assert not np.any(stats.admitted) and not np.any(end.ham.cache.count)
    assert_tree_close((y, GDNCache(end.ham.rnn, end.conv)), (y_gdn, end_gdn))
    y, end, _ = call(layer, x[:, :1], end)
    y_gdn, end_gdn, _ = call(gdn, x[:, :1], end_gdn)
    assert_tree_close((y, GDNCache(end.ham.rnn, end.conv)), (y_gdn, end_gdn))


# ------------------------------------------------------------------------------ threshold


def test_update_threshold_moves_tau_toward_target(x):
    target = 0.3
    config = ops.ThresholdConfig(initial_tau=0.5, target_fraction=target, learning_rate=1.0)
    layer = make(capacity=T, threshold=config)

    @nnx.jit
    def controlled_step(layer, x):
        _, _, stats = layer(x, cache=layer.init_cache(B, T))
        layer.update_threshold(stats.over_tau)
        return stats.kv_fraction  # == over_tau: the cache has room for every token

    fractions, taus = [], []
    for _ in range(40):
        fractions.append(float(controlled_step(layer, x)))
        taus.append(float(layer.tau))
    first_error = fractions[0] - target
    assert abs(first_error) > 0.1
    assert np.sign(taus[0] - 0.5) == np.sign(first_error)  # too many admitted: tau up; too few: down
    assert abs(np.mean(fractions[-10:]) - target) < 0.05
    assert int(layer.threshold.get_value().step) == 40


def test_a_full_cache_does_not_wind_the_controller_up():
    """The issue's reproduction: 4 slots, T = 64, target 0.25. Admissions are capped at 4 / 64, so a
    controller fed them pushed tau from 0.5 towards 0 without end (about 1e-13 after 3,000 steps).
    It follows the tokens over tau instead, which settle at the target with tau at the scores'
    0.75 quantile."""
    t, target = 64, 0.25
    config = ops.ThresholdConfig(initial_tau=0.5, target_fraction=target, learning_rate=0.1)
    layer = make(capacity=4, threshold=config)
    x = normal(7, (B, t, D))
    graphdef, state = nnx.split(layer)

    @jax.jit
    def controlled(state):
        def step(_, state):
            layer = nnx.merge(graphdef, state)
            layer.update_threshold(layer(x)[2].over_tau)
            return nnx.state(layer)

        return jax.lax.fori_loop(0, 3000, step, state)

    nnx.update(layer, controlled(state))
    _, _, stats = layer(x)
    assert float(stats.kv_fraction) == pytest.approx(4 / t)  # every cache full
    assert abs(float(stats.over_tau) - target) <= 2 / (B * t)  # within a token or two of the target
    scores = np.asarray(stats.scores)
    assert np.quantile(scores, 0.7) <= float(layer.tau) <= np.quantile(scores, 0.8)


def test_a_per_head_threshold_keeps_its_shape(x):
    config = ops.ThresholdConfig(target_fraction=0.3, learning_rate=1.0, per_head=True)
    layer = make(threshold=config)
    assert layer.tau.shape == (H,)
    _, _, stats = layer(x)
    layer.update_threshold(stats.over_tau_per_head)
    assert layer.tau.shape == (H,) and len(np.unique(np.asarray(layer.tau))) == H
    with pytest.raises(ValueError, match="would change the threshold's shape"):
        make().update_threshold(stats.over_tau_per_head)


def test_threshold_is_not_touched_by_gradients(x):
    layer = make("learned")
    set_tau(layer, 0.1, step=3)
    grads = loss_grads(layer, x)
    assert not nnx.to_flat_state(nnx.state(grads, Threshold))
    optimizer = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
    kernel = np.array(layer.proj.out_proj.kernel[...])
    optimizer.update(layer, grads)
    assert_tree_close(layer.threshold.get_value(), ops.ThresholdState(jnp.log(jnp.float32(0.1)), jnp.int32(3)))
    assert not np.allclose(layer.proj.out_proj.kernel[...], kernel)  # the Params did move


def test_threshold_round_trips_split_merge(layer):
    set_tau(layer, 0.123, step=7)
    graphdef, state = nnx.split(layer)
    restored = nnx.merge(graphdef, state)
    assert_tree_close(restored.threshold.get_value(), layer.threshold.get_value())
    assert nnx.to_flat_state(nnx.state(layer, Threshold)) and not nnx.to_flat_state(
        nnx.state(layer, nnx.All(nnx.Param, Threshold))
    )
    fresh = make(layer.router, seed=4)
    nnx.update(fresh, nnx.state(layer))  # as when restoring a checkpoint
    assert_tree_close(fresh.threshold.get_value(), layer.threshold.get_value())


# ------------------------------------------------------------------------------ routers, errors


def test_learned_router_receives_gradient(x):
    """Through the log-score bias of the attention logits (DESIGN.md §1.1 step 7)."""
    layer = make("learned")
    set_tau_in_gap(layer, call(layer, x, layer.init_cache(B, T))[2].scores, quantiles=(0.05, 0.3))  # many admitted
    grads = loss_grads(layer, x)
    for leaf in jax.tree.leaves(nnx.state(grads)):
        assert np.all(np.isfinite(leaf))
    for grad in (grads.router_mlp.hidden.kernel, grads.router_mlp.out.kernel, grads.log_logit_scale, grads.gamma):
        assert np.linalg.norm(grad[...]) > 1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(router="mlp"), "router.*'mlp'"),
        (dict(capacity=0), "capacity.*0"),
        (dict(capacity=-2), "capacity.*-2"),
        (dict(capacity=2.5), "capacity.*2.5"),
        (dict(attention="flash"), "attention.*'flash'"),
        (dict(logit_scale_init=-1.0), "logit_scale_init.*-1.0"),
        (dict(chunk_size=0), "chunk_size.*0"),
        (dict(router="learned", router_hidden=0), "router_hidden.*0"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_bad_input_raises(layer):
    with pytest.raises(ValueError, match=r"x must have shape.*\(2, 5, 15\)"):
        layer(jnp.zeros((B, 5, D - 1)))
    with pytest.raises(ValueError, match="key_dim.*7"):
        HAM(D, H, 7, V, capacity=4, rngs=nnx.Rngs(0))
    HAM(D, H, 7, V, capacity=4, rope_theta=None, rngs=nnx.Rngs(0))  # odd K is fine without RoPE
