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
from hamjax.generate import cache_memory, kv_entry_bytes
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
    """What bf16 changes and what it leaves: the residual stream and the KV cache's keys and values
    (cache_dtype None follows dtype) are bfloat16; the RNN state, the conv state, the cached scores
    and the routing scores stay float32; a decode step keeps every cache array's dtype."""
    model = LanguageModel(config("ham,gdn", "bfloat16"), rngs=nnx.Rngs(0))
    x = model.embed(tokens())
    assert x.dtype == jnp.bfloat16
    y, cache, stats = model.blocks[0](x)
    assert y.dtype == jnp.bfloat16 and stats.scores.dtype == jnp.float32
    assert cache.ham.cache.keys.dtype == cache.ham.cache.values.dtype == jnp.bfloat16
    assert cache.ham.rnn.dtype == cache.ham.cache.scores.dtype == cache.conv.dtype == jnp.float32
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    empty = model.init_cache(2, T + 1)
    _, after, _ = model.extend(tokens()[:, :1], empty)
    assert jax.tree.map(lambda a: a.dtype, after) == jax.tree.map(lambda a: a.dtype, empty)


@nnx.jit
def extend(model, x, cache, taus):
    return model.extend(x, cache, taus=taus)


def test_bf16_kv_cache_holds_half_the_key_and_value_bytes():
    """cache_dtype="bfloat16": HAM's and attention's caches hold keys and values in bf16, half the
    bytes of float32 (each entry's int32 position and float32 score stay); the memory report and the
    full-attention comparison use the dtype held; the logits stay within BF16_TOL of the fp32 cache's."""
    models = {d: LanguageModel(config("ham,attention", "float32", cache_dtype=d), rngs=nnx.Rngs(0))
              for d in ("float32", "bfloat16")}
    x = tokens()
    results = {d: extend(m, x, m.init_cache(2, T), None) for d, m in models.items()}
    kv_bytes = {}
    for d, (_, cache, _) in results.items():
        ham, attention = cache.layers
        arrays = (ham.ham.cache.keys, ham.ham.cache.values, attention.keys, attention.values)
        assert {a.dtype for a in arrays} == {jnp.dtype(d)}
        assert ham.ham.rnn.dtype == ham.ham.cache.scores.dtype == jnp.float32
        kv_bytes[d] = sum(a.nbytes for a in arrays)
        layers = cache_memory(models[d], cache, T)
        assert [layer.dtype for layer in layers] == [d, d]
        size = jnp.dtype(d).itemsize
        assert layers[0].entry_bytes == kv_entry_bytes(16, 16, d) == 2 * 16 * size + 8
        assert layers[1].full_attention_bytes == T * 2 * (2 * 16 * size + 4)
    assert kv_bytes["bfloat16"] == kv_bytes["float32"] // 2
    assert rel_rms(results["bfloat16"][0], results["float32"][0]) <= BF16_TOL


@pytest.mark.parametrize("kind", MIXERS)
def test_bf16_prefill_then_steps_equal_the_full_forward(kind):
    """In bf16, a prefill of 9 tokens then one token at a time (the single-step forms, in float32
    arithmetic on bf16 activations) against one pass (the chunked and blockwise forms): logits
    within BF16_TOL, and HAM's admissions the same wherever the score is further from tau than the
    rounding can move it (4 eps of the score; with tau in a wide gap, that is every token)."""
    model = LanguageModel(config(kind, "bfloat16", capacity=12), rngs=nnx.Rngs(0))
    x = tokens()[:1]
    taus = scores = None
    if kind == "ham":
        first = model.blocks[0]
        scores = np.asarray(first.mixer(first.mixer_norm(model.embed(x)))[2].scores)  # [B, T, H]
        taus = jnp.full((1,), tau_in_gap(scores), jnp.float32)
    full, _, full_stats = extend(model, x, model.init_cache(1, T), taus)
    logits, cache, stats = extend(model, x[:, :9], model.init_cache(1, T), taus)
    steps, admitted = [logits], [stats.admitted]
    for t in range(9, T):
        logits, cache, stats = extend(model, x[:, t : t + 1], cache, taus)
        steps.append(logits)
        admitted.append(stats.admitted)
    assert rel_rms(jnp.concatenate(steps, axis=1), full) <= BF16_TOL
    if kind == "ham":
        clear = np.abs(scores - float(taus[0])) > BF16_TOL * np.abs(scores)
        admitted, expected = np.asarray(jnp.concatenate(admitted, axis=2))[0], np.asarray(full_stats.admitted)[0]
        assert clear.mean() > 0.9 and expected.any() and not expected.all()
        np.testing.assert_array_equal(admitted[clear], expected[clear])


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
