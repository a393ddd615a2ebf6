"""Forward-mode autodiff (jax.jvp) through the delta rule, the short convolution and every layer.

Each jvp is checked two ways: against central finite differences with Richardson extrapolation
(truncation error O(h^4); in float32 the rounding error of the differences is about
1e-7 |f| / h, so a relative RMS error of 2e-3 at h = 1e-2 or 1e-3 is far above rounding and below a
wrong derivative), and against reverse mode by the exact identity <u, J t> = <J^T u, t>.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hamjax import ops
from hamjax.nn import HAM, GatedDeltaNet, LanguageModel, ModelConfig
from hamjax.nn.conv import masked_taps
from layer_checks import normal
from oracles import rel_rms

B, T, D, H, K, V = 2, 20, 16, 2, 8, 6
FD_TOL = 2e-3
DOT_TOL = 1e-5


def random_like(tree, seed, scale=1.0):
    """A float32 normal pytree shaped like `tree` (a tangent or cotangent)."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(scale * rng.standard_normal(np.shape(x)), jnp.float32) for x in leaves]
    )


def along(primals, tangents, s):
    return jax.tree.map(lambda p, t: p + s * t, primals, tangents)


def finite_difference(f, primals, tangents, h=1e-2):
    """d/ds f(primals + s tangents) at s = 0: central differences at h and h/2, extrapolated."""
    at = jax.jit(lambda s: f(*along(primals, tangents, s)))
    central = lambda h: jax.tree.map(lambda a, b: (a - b) / (2 * h), at(h), at(-h))
    coarse, fine = central(h), central(h / 2)
    return jax.tree.map(lambda c, f: (4 * f - c) / 3, coarse, fine)


def check_jvp(f, primals, seed=0, h=1e-2, finite_differences=True):
    """jax.jvp of f at `primals` (a tuple of pytrees) against finite differences (unless told not
    to) and reverse mode."""
    tangents = random_like(primals, seed)
    out, jvp_out = jax.jit(lambda p, t: jax.jvp(f, p, t))(primals, tangents)
    if finite_differences:
        numeric = finite_difference(f, primals, tangents, h)
        for got, want in zip(jax.tree.leaves(jvp_out), jax.tree.leaves(numeric)):
            error = rel_rms(got, want)
            assert error <= FD_TOL, f"jvp vs finite differences: relative RMS error {error:.2e}"
    cotangent = random_like(out, seed + 1)
    pullback = jax.vjp(f, *primals)[1](cotangent)
    dot = lambda a, b: sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    forward, backward = dot(cotangent, jvp_out), dot(pullback, tangents)
    assert abs(forward - backward) <= DOT_TOL * (abs(forward) + abs(backward)) + 1e-6, (forward, backward)


def test_unit_lower_inverse_jvp_matches_float64():
    """d(I + L)^-1 = -Y StrictLower(dL) Y: the tangent ignores dL on and above the diagonal, where the
    function does not read L."""
    rng = np.random.default_rng(1)
    n = 5
    lower = np.tril(rng.standard_normal((3, n, n)) * 0.3, -1)
    d_lower = rng.standard_normal(lower.shape)  # nonzero everywhere, upper part included
    inverse = np.linalg.inv(np.eye(n) + lower)
    expected = -inverse @ np.tril(d_lower, -1) @ inverse
    _, tangent = jax.jvp(ops.delta_rule.unit_lower_inverse, (jnp.float32(lower),), (jnp.float32(d_lower),))
    assert rel_rms(tangent, expected) <= 1e-5


def test_masked_taps_jvp_equals_its_formula_differentiated():
    rng = np.random.default_rng(2)
    inputs, weight = normal(3, (B, T + 3, 5), (4, 5))
    keep = jnp.asarray(rng.random((4, B, T)) > 0.3)
    check_jvp(lambda a, w: masked_taps(a, w, keep), (inputs, weight))


def test_chunked_delta_rule_jvp(chunk_size=4):
    """All of q, k, v, g, beta and the initial state move; five chunks, two segments per row."""
    q, k, v = normal(4, (B, T, H, K), (B, T, H, K), (B, T, H, V))
    q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    rng = np.random.default_rng(5)
    g = jnp.asarray(-rng.uniform(0.05, 1.0, (B, T, H)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.1, 0.9, (B, T, H)), jnp.float32)
    state = normal(6, (B, H, K, V))
    segment_ids = jnp.asarray([[0] * 13 + [1] * 7, [0] * 5 + [1] * 15])

    def rule(q, k, v, g, beta, state):
        result = ops.gated_delta_rule_with_errors(
            q, k, v, g, beta, initial_state=state, chunk_size=chunk_size, segment_ids=segment_ids
        )
        return result.output, result.state, result.errors

    check_jvp(rule, (q, k, v, g, beta, state))


def pure_layer(layer, **call_kwargs):
    """layer as f(params, x) -> its outputs (y, cache, stats), every other variable held fixed."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    return lambda params, x: nnx.merge(graphdef, params, rest)(x, **call_kwargs), params


def test_gdn_layer_jvp():
    layer = GatedDeltaNet(D, H, K, V, conv_width=4, chunk_size=8, rngs=nnx.Rngs(0))
    segment_ids = jnp.asarray([[0] * 13 + [1] * 7, [0] * 20])
    f, params = pure_layer(layer, segment_ids=segment_ids)
    check_jvp(lambda p, x: f(p, x)[:2], (params, normal(1, (B, T, D))))


@pytest.mark.parametrize("attention, router", [("compacted", "surprise"), ("dense", "learned")])
def test_ham_layer_jvp(attention, router):
    """With tau in a wide gap between the scores, no admission decision changes along the
    finite-difference path (asserted; a short step, h = 1e-3, as every parameter moves), so the
    layer is smooth there."""
    layer = HAM(D, H, K, V, capacity=6, router=router, attention=attention, chunk_size=8, rngs=nnx.Rngs(0))
    x = normal(1, (B, T, D))
    segment_ids = jnp.asarray([[0] * 13 + [1] * 7, [0] * 20])
    scores = np.unique(np.asarray(layer(x, segment_ids=segment_ids)[2].scores))
    middle = scores[len(scores) // 4 : 3 * len(scores) // 4]
    i = int(np.argmax(np.diff(middle)))
    tau = jnp.float32((middle[i] + middle[i + 1]) / 2)
    f, params = pure_layer(layer, segment_ids=segment_ids, tau=tau)
    decisions = jax.jit(lambda s: f(*along((params, x), random_like((params, x), 0), s))[2].admitted)
    admitted = decisions(0.0)
    assert 0 < int(jnp.sum(admitted)) < admitted.size
    for s in (-1e-3, -5e-4, 5e-4, 1e-3):
        assert bool(jnp.all(decisions(s) == admitted)), f"a decision flips at s = {s}: pick another seed"

    def outputs(params, x):
        y, cache, _ = f(params, x)
        return y, cache.ham.rnn, cache.ham.cache.values

    check_jvp(outputs, (params, x), h=1e-3)


def test_language_model_jvp_through_ham_and_attention_blocks():
    """jax.jvp of the logits with respect to every parameter, through a HAM block and a
    sliding-window attention block (the blockwise kernel's custom_jvp, window masks included; GDN is
    checked as a layer above); against reverse mode."""
    config = ModelConfig(vocab_size=32, d_model=D, n_layers=2, pattern="ham,swa", heads=H, key_dim=K,
                         value_dim=K, window=8, capacity=6, chunk_size=8)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 32, (B, T)), jnp.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    check_jvp(lambda params: nnx.merge(graphdef, params, rest)(tokens)[0], (params,), finite_differences=False)
