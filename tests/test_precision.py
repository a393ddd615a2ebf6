"""Mixed precision: ModelConfig.dtype="bfloat16" computes the projections, MLPs and the residual
stream in bfloat16 with float32 weights, while the recurrence, gates, routing, softmax, norms,
logits and loss stay float32 (the README's precision policy).

Tolerance for bf16 against fp32: bfloat16 keeps 8 significant bits, unit roundoff u = 2^-8. A
rounding is uniform within +-u/2 of the value's spacing, so each adds a relative error of RMS about
u / sqrt(3). Through one block an activation is rounded about 15 times in sequence (the embedding,
the norms' outputs, each projection's input and output, RoPE, SiLU's sigmoid and product, the
MLP's product, the residual adds), so one block's output carries about sqrt(15) u / sqrt(3), 0.009
relative RMS. The tests allow 4 eps = 8u (0.031) for a one-block model: a factor 3 for errors that
grow through the weights and through cancelling sums. Deeper models compound the error (2 blocks
measure about 0.03 here); what that does to training is the 200-step test's question.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hamjax import ops
from hamjax.nn import LanguageModel, ModelConfig
from hamjax.nn.model import MIXERS
from oracles import rel_rms

BF16_TOL = 4 * float(jnp.finfo(jnp.bfloat16).eps)  # = 8 u, see the module docstring
VOCAB, T = 64, 32


def config(pattern: str, dtype: str, **kwargs) -> ModelConfig:
    values = dict(vocab_size=VOCAB, d_model=32, n_layers=len(pattern.split(",")), pattern=pattern, heads=2, key_dim=16, value_dim=16,
                  capacity=T, window=8, chunk_size=8, dtype=dtype)
    return ModelConfig(**(values | kwargs))


def tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, T)), jnp.int32)


def tau_in_gap(scores) -> float:
    """The middle of the widest gap between the central half of the sorted scores."""
    s = np.unique(np.asarray(scores, np.float64))
    middle = s[len(s) // 4 : 3 * len(s) // 4]
    i = int(np.argmax(np.diff(middle)))
    return float((middle[i] + middle[i + 1]) / 2)


@pytest.mark.parametrize("router", ["surprise", "learned"])
@pytest.mark.parametrize("kind", MIXERS)
def test_bf16_forward_of_every_block_kind_is_close_to_fp32(kind, router):
    """A one-block model of each kind, the same weights (float32 in both) run in bf16 and fp32:
    logits within BF16_TOL, every HAM admission decision the same (tau midway in a wide gap of the
    fp32 scores), the logits float32."""
    if kind != "ham" and router == "learned":
        pytest.skip("the router belongs to HAM")
    fp32, bf16 = (LanguageModel(config(kind, dtype, router=router), rngs=nnx.Rngs(0)) for dtype in ("float32", "bfloat16"))
    x = tokens()
    taus = None
    if kind == "ham":
        first = fp32.blocks[0]
        _, _, stats = first.mixer(first.mixer_norm(fp32.embed(x)))
        taus = jnp.full((1,), tau_in_gap(stats.scores), jnp.float32)
    run = lambda model: model.extend(x, model.init_cache(2, T), taus=taus)
    (logits32, _, stats32), (logits16, _, stats16) = run(fp32), run(bf16)
    assert logits16.dtype == jnp.float32
    assert rel_rms(logits16, logits32) <= BF16_TOL
    if kind == "ham":
        assert stats16.admitted.any() and not stats16.admitted.all()
        np.testing.assert_array_equal(stats16.admitted, stats32.admitted)


def test_bf16_activations_between_blocks_and_float32_state():
    """What bf16 changes and what it leaves: the residual stream is bfloat16; the RNN state, the KV
    cache, the conv state and the routing scores stay float32, so a decode carries one cache type."""
    model = LanguageModel(config("ham,gdn", "bfloat16"), rngs=nnx.Rngs(0))
    x = model.embed(tokens())
    assert x.dtype == jnp.bfloat16
    y, cache, stats = model.blocks[0](x)
    assert y.dtype == jnp.bfloat16 and stats.scores.dtype == jnp.float32
    assert cache.ham.rnn.dtype == cache.ham.cache.keys.dtype == cache.conv.dtype == jnp.float32
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    empty = model.init_cache(2, T + 1)
    _, after, _ = model.extend(tokens()[:, :1], empty)
    assert jax.tree.map(lambda a: a.dtype, after) == jax.tree.map(lambda a: a.dtype, empty)


@pytest.mark.parametrize("g, beta", [(-1e3, 0.5), (-1e-3, 1e-6), (-1e-3, 1.0 - 1e-3), (0.0, 1.0)])
def test_extreme_gates_stay_finite_in_bf16(g, beta):
    """The chunked delta rule on bf16 inputs with decays down to -1e3 and beta near 0 and 1."""
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.standard_normal((1, 24, 2, 8)), jnp.bfloat16) for _ in range(2))
    k = k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True).astype(jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((1, 24, 2, 4)), jnp.bfloat16)
    gates = jnp.full((1, 24, 2), g, jnp.bfloat16), jnp.full((1, 24, 2), beta, jnp.bfloat16)
    out = ops.gated_delta_rule_with_errors(q, k, v, *gates, chunk_size=8)
    reference = ops.gated_delta_rule_with_errors(q, k, v, *gates, method="recurrent")
    for a, b in zip(out, reference):
        assert np.isfinite(np.asarray(a, np.float32)).all()
        assert rel_rms(np.asarray(a, np.float32), np.asarray(b, np.float32)) <= BF16_TOL


def test_bf16_training_of_the_tiny_preset_ends_within_2_percent_of_fp32():
    """200 steps of the tiny preset on its data, bf16 against fp32, same seed and batches."""
    from hamjax.data import batch_at
    from hamjax.train import make_optimizer, preset, train_step
    from hamjax.train.loop import load_corpus

    tiny = preset("tiny")
    corpus = load_corpus(tiny)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = LanguageModel(dataclasses.replace(tiny.model, dtype=dtype), rngs=nnx.Rngs(0))
        optimizer = make_optimizer(model, dataclasses.replace(tiny.train, steps=200))
        recent = []
        for step in range(200):
            batch = batch_at(corpus.train, step, tiny.train.batch_size, 0)
            metrics = train_step(model, optimizer, jnp.asarray(batch.tokens)[None], jnp.asarray(batch.segment_ids)[None])
            recent = (recent + [float(metrics.loss)])[-20:]
        assert np.isfinite(recent).all(), dtype
        losses[dtype] = float(np.mean(recent))  # the last 20 steps' mean: less noise than one step
    assert abs(losses["bfloat16"] - losses["float32"]) <= 0.02 * losses["float32"], losses
