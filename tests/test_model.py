"""hamjax.nn.model: the language model (every block pattern, the sum of its parts, packed documents,
remat, the paper preset's size, bad inputs) and the optimizer's weight-decay mask.

All forward passes of one pattern share one jitted call on one batch of three rows,
[doc A | doc B], [doc A | filler], [doc B | filler], so that every test of a pattern reuses one
compilation. Causality makes the filler irrelevant to the logits of the documents before it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hamjax.nn import HAM, NoWeightDecay, Threshold
from hamjax.nn import MixerStats
from hamjax.nn.model import CACHE_TYPES, MIXERS, LanguageModel, ModelCache, ModelConfig, ModelStats
from hamjax.train import preset, weight_decay_mask
from oracles import rel_rms

VOCAB, HEADS, T = 64, 2, 24
LEN_A = 13  # doc A is tokens 0..12 of the packed row, doc B tokens 13..23
LEN_B = T - LEN_A
CAPACITY = 4  # fewer slots than either document's surprising tokens: the cache overflows and must reset
PATTERNS = ["ham", "gdn", "attention", "swa", "gdn,gdn,gdn,attention", "gdn,swa", "ham,attention"]
TOL = 1e-5  # relative RMS error in float32 (DESIGN.md §2)


def config(pattern: str, **kwargs) -> ModelConfig:
    """A tiny model: 2 layers (or one per pattern entry), window 8 < both documents."""
    values = dict(
        vocab_size=VOCAB, d_model=32, n_layers=max(2, len(pattern.split(","))), pattern=pattern, heads=HEADS,
        key_dim=16, value_dim=16, capacity=CAPACITY, window=8, chunk_size=8,
    )
    return ModelConfig(**(values | kwargs))



def make_batch():
    rng = np.random.default_rng(0)
    doc_a, doc_b, filler = (rng.integers(0, VOCAB, n) for n in (LEN_A, LEN_B, T))
    tokens = np.stack([
        np.concatenate([doc_a, doc_b]),
        np.concatenate([doc_a, filler[:LEN_B]]),
        np.concatenate([doc_b, filler[:LEN_A]]),
    ]).astype(np.int32)
    segment_ids = np.zeros((3, T), np.int32)
    segment_ids[0, LEN_A:] = 1
    return jnp.asarray(tokens), jnp.asarray(segment_ids)


TOKENS, SEGMENT_IDS = make_batch()


def split_logits(logits):
    """-> (doc A packed, doc A alone, doc B packed, doc B alone)."""
    return logits[0, :LEN_A], logits[1, :LEN_A], logits[0, LEN_A:], logits[2, :LEN_B]


@nnx.jit
def forward(model, tokens, segment_ids):
    return model(tokens, segment_ids=segment_ids)


_models: dict[tuple, LanguageModel] = {}


def model_for(pattern: str, **kwargs) -> LanguageModel:
    """One model per pattern and config kwargs for the whole module (never mutated: tests that change
    state clone it)."""
    key = (pattern, tuple(sorted(kwargs.items())))
    if key not in _models:
        _models[key] = LanguageModel(config(pattern, **kwargs), rngs=nnx.Rngs(0))
    return _models[key]


# --- every block pattern ---------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_builds_and_runs(pattern):
    model = model_for(pattern)
    kinds = [kind.strip() for kind in pattern.split(",")]
    assert [block.kind for block in model.blocks] == [kinds[i % len(kinds)] for i in range(len(model.blocks))]
    logits, stats = forward(model, TOKENS, SEGMENT_IDS)
    assert logits.shape == (3, T, VOCAB) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits)), f"{pattern}: non-finite logits"
    assert isinstance(stats, ModelStats)
    n_ham = sum(block.kind == "ham" for block in model.blocks)
    assert n_ham == len(model.ham_layers)
    assert stats.kv_fraction.shape == (n_ham,)
    assert stats.kv_fraction_per_head.shape == (n_ham, HEADS)
    assert np.all((stats.kv_fraction >= 0) & (stats.kv_fraction <= 1))
    np.testing.assert_allclose(stats.kv_fraction, np.mean(stats.kv_fraction_per_head, axis=1), rtol=1e-6)
    assert stats.admitted.shape == (n_ham, 3, T, HEADS) and stats.admitted.dtype == jnp.bool_
    np.testing.assert_allclose(np.mean(stats.admitted, axis=(1, 2)), stats.kv_fraction_per_head, rtol=1e-6)  # no padding
    assert model.taus().shape == (n_ham,)


def test_kv_fractions_per_layer_follow_the_mixers():
    model_config = config("gdn,swa,ham,attention", n_layers=5)  # window 8
    assert model_config.kv_fractions(32, np.array([0.125])) == [0.0, 0.25, 0.125, 1.0, 0.0]
    assert model_config.kv_fractions(4, [0.5]) == [0.0, 1.0, 0.5, 1.0, 0.0]  # a window longer than the row holds it all
    assert config("ham,ham").kv_fractions(16, np.array([0.25, 0.75])) == [0.25, 0.75]


def test_unknown_mixer_raises():
    with pytest.raises(ValueError, match="mamba"):
        ModelConfig(pattern="ham,mamba")
    assert set(MIXERS) == {"ham", "gdn", "attention", "swa"}


def test_pattern_repeats_to_n_layers():
    assert ModelConfig(pattern=" gdn , swa ", n_layers=5).mixers == ("gdn", "swa", "gdn", "swa", "gdn")


# --- the model is the sum of its parts -------------------------------------------------------------


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_model_equals_manual_composition(tie_embeddings):
    """embed -> x + attention(RMSNorm(x)) -> + SwiGLU(RMSNorm(.)) -> final RMSNorm -> embed.attend (or head)."""
    model = LanguageModel(config("attention", n_layers=1, tie_embeddings=tie_embeddings), rngs=nnx.Rngs(3))
    assert (model.head is None) == tie_embeddings
    logits, stats = model(TOKENS, segment_ids=SEGMENT_IDS)  # eager: the same ops as below
    assert stats.kv_fraction.shape == (0,) and stats.kv_fraction_per_head.shape == (0, HEADS)
    block, table = model.blocks[0], model.embed.embedding[...]
    x = table[TOKENS]
    x = x + block.mixer(block.mixer_norm(x), segment_ids=SEGMENT_IDS)[0]
    h = block.mlp_norm(x)
    x = x + block.mlp.down_proj(jax.nn.silu(block.mlp.gate_proj(h)) * block.mlp.up_proj(h))
    features = model.final_norm(x)
    expected = features @ (table.T if tie_embeddings else model.head.kernel[...])
    assert rel_rms(logits, expected) <= 1e-6
    block_out, block_cache, block_stats = block(table[TOKENS], segment_ids=SEGMENT_IDS)
    assert block_cache is None and block_stats == MixerStats()  # attention without a cache: none kept, nothing measured
    assert rel_rms(block_out, x) <= 1e-6
    if not tie_embeddings:  # the separate head is used, not the embedding
        assert rel_rms(logits, features @ table.T) > 0.1


# --- packed documents ------------------------------------------------------------------------------


CONV_ATTENTION = dict(attention_conv=True)  # attention and sliding-window layers with a short conv


@pytest.mark.parametrize("pattern, options", [("gdn", {}), ("attention", {}), ("swa", {}), ("gdn,swa", {}),
                                              ("attention,swa", CONV_ATTENTION)])
def test_packed_documents_equal_separate_runs(pattern, options):
    logits, _ = forward(model_for(pattern, **options), TOKENS, SEGMENT_IDS)
    a_packed, a_alone, b_packed, b_alone = split_logits(logits)
    assert rel_rms(a_packed, a_alone) <= TOL
    assert rel_rms(b_packed, b_alone) <= TOL, f"{pattern}: doc B sees doc A across the boundary"
    # The filler after doc A does change the logits after it (the comparison is not vacuous).
    assert rel_rms(logits[1, LEN_A:], b_packed) > 0.01


@nnx.jit
def forward_by_layer(model, tokens, segment_ids):
    """The model spelt out block by block, returning the HAM layers' MixerStats as well."""
    x = model.embed(tokens)
    stats = []
    for block in model.blocks:
        y, _, layer_stats = block.mixer(block.mixer_norm(x), segment_ids=segment_ids)
        if block.kind == "ham":
            stats.append(layer_stats)
        x = x + y
        x = x + block.mlp(block.mlp_norm(x))
    return model.embed.attend(model.final_norm(x)), stats


def set_tau(layer: HAM, tau: float) -> None:
    layer.threshold.set_value(layer.threshold.get_value()._replace(log_tau=jnp.log(jnp.float32(tau))))


def tau_in_gap(scores) -> float:
    """The middle of the widest gap between the sorted scores in their central 30-70% range: no
    score lies near it, so packed and separate runs cannot decide differently on rounding."""
    s = np.sort(np.asarray(scores, np.float64).ravel())
    lo, hi = int(0.3 * len(s)), int(0.7 * len(s))
    i = lo + int(np.argmax(np.diff(s[lo:hi + 1])))
    return float((s[i] + s[i + 1]) / 2)


def test_packed_documents_equal_separate_runs_ham():
    """Two HAM layers with tau set (layer by layer) in a gap of the scores, and a 4-slot cache that
    both documents overflow: doc B's cache must start empty at the boundary."""
    model = nnx.clone(model_for("ham"))
    for i, layer in enumerate(model.ham_layers):
        _, stats = forward_by_layer(model, TOKENS, SEGMENT_IDS)
        set_tau(layer, tau_in_gap(stats[i].scores))
    manual_logits, stats = forward_by_layer(model, TOKENS, SEGMENT_IDS)
    logits, model_stats = forward(model, TOKENS, SEGMENT_IDS)
    assert rel_rms(logits, manual_logits) <= 1e-6, "LanguageModel differs from its blocks composed by hand"
    a_packed, a_alone, b_packed, b_alone = split_logits(logits)
    overflowed = False
    for i, (layer, layer_stats) in enumerate(zip(model.ham_layers, stats)):
        scores, admitted = np.asarray(layer_stats.scores), np.asarray(layer_stats.admitted)
        margin = float(np.min(np.abs(scores - float(layer.tau))))
        assert margin > 1e-4, f"layer {i}: a score lies {margin:.2g} from tau (tie)"
        np.testing.assert_array_equal(admitted[0, :LEN_A], admitted[1, :LEN_A], err_msg=f"layer {i}, doc A")
        np.testing.assert_array_equal(admitted[0, LEN_A:], admitted[2, :LEN_B], err_msg=f"layer {i}, doc B")
        assert rel_rms(scores[0, LEN_A:], scores[2, :LEN_B]) <= TOL
        candidates_a = np.sum(scores[1, :LEN_A] > float(layer.tau), axis=0)
        overflowed |= bool(np.any(candidates_a > CAPACITY))
        assert np.all(np.sum(admitted[0, LEN_A:], axis=0) <= CAPACITY)
        assert 0 < admitted.mean() < 1
        np.testing.assert_allclose(model_stats.kv_fraction[i], admitted.mean(), rtol=1e-6)
    assert overflowed, "doc A never fills the cache: the reset at the boundary is not tested"
    assert rel_rms(a_packed, a_alone) <= TOL
    assert rel_rms(b_packed, b_alone) <= TOL


@pytest.mark.parametrize("tau", [1e-6, 1e6], ids=["all-candidates", "none"])
def test_packed_documents_equal_separate_runs_ham_extreme_tau(tau):
    model = nnx.clone(model_for("ham"))
    for layer in model.ham_layers:
        set_tau(layer, tau)
    logits, stats = forward(model, TOKENS, SEGMENT_IDS)
    # Every token is a candidate, so each document admits exactly its first CAPACITY tokens per head.
    expected = (2 * CAPACITY + 2 * CAPACITY) / (3 * T) if tau < 1 else 0.0
    np.testing.assert_allclose(stats.kv_fraction, expected, rtol=1e-6)
    a_packed, a_alone, b_packed, b_alone = split_logits(logits)
    assert rel_rms(a_packed, a_alone) <= TOL
    assert rel_rms(b_packed, b_alone) <= TOL


# --- remat -----------------------------------------------------------------------------------------


def test_remat_gives_same_logits_and_gradients():
    weights = jnp.asarray(np.random.default_rng(5).standard_normal((3, T, VOCAB)), jnp.float32)

    def loss(model):
        logits, _ = model(TOKENS, segment_ids=SEGMENT_IDS)
        return jnp.sum(logits * weights), logits

    grad = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    results = {}
    for remat in (False, True):
        model = LanguageModel(config("ham", n_layers=1, remat=remat), rngs=nnx.Rngs(7))
        set_tau(model.ham_layers[0], 1e-6)  # every token a candidate: no admission tie can differ
        (_, logits), grads = grad(model)
        results[remat] = logits, nnx.to_pure_dict(grads)
    (logits, grads), (logits_remat, grads_remat) = results[False], results[True]
    assert rel_rms(logits_remat, logits) <= 1e-6
    flat, flat_remat = (jax.tree_util.tree_flatten_with_path(g)[0] for g in (grads, grads_remat))
    assert [p for p, _ in flat] == [p for p, _ in flat_remat]
    errors = {}
    for (path, g), (_, g_remat) in zip(flat, flat_remat):
        assert np.all(np.isfinite(g_remat))
        if np.any(g):
            errors[jax.tree_util.keystr(path)] = rel_rms(g_remat, g)
        else:
            np.testing.assert_array_equal(g_remat, g)
    # Recomputation changes XLA's fusions and so the order of the reductions over tokens: the
    # gradients of per-head scalars (A_log, dt_bias) differ by a few float32 roundings (1.7e-6 seen).
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, f"{worst}: relative RMS error {errors[worst]:.3g}"
    assert np.median(list(errors.values())) <= 1e-6


# --- the paper preset ------------------------------------------------------------------------------


def test_paper_preset_parameter_count():
    abstract = nnx.eval_shape(lambda: LanguageModel(preset("paper").model, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves), "parameters were materialised"
    count = sum(math.prod(leaf.shape) for leaf in leaves)
    assert 750e6 <= count <= 850e6, f"the paper preset has {count:,} parameters"


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [VOCAB, 1000, -1])
def test_token_ids_outside_vocabulary_raise(bad_id):
    tokens = np.array(TOKENS)
    tokens[1, 5] = bad_id
    with pytest.raises(ValueError, match=f"id {bad_id} "):
        model_for("attention")(jnp.asarray(tokens))


def test_float_tokens_raise():
    with pytest.raises(ValueError, match="tokens"):
        model_for("attention")(jnp.zeros((1, 4), jnp.float32))


@pytest.mark.parametrize(
    "field, value",
    [
        ("d_model", 0),
        ("n_layers", 0),
        ("vocab_size", -3),
        ("heads", 1.5),
        ("capacity", 0),
        ("mlp_hidden", 0),
        ("router", "x"),
        ("ham_attention", "sparse"),
        ("kv_target", 1.5),
        ("kv_target", 0.0),
        ("tau_init", 0.0),
        ("tau_lr", -1.0),
        ("tau_freeze_steps", -1),
    ],
)
def test_invalid_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError) as error:
        ModelConfig(**{field: value})
    assert field in str(error.value), f"the error does not name {field!r}: {error.value}"


# --- weight decay ----------------------------------------------------------------------------------

DECAYED = {"kernel", "embedding"}  # Linear kernels (all projections, MLP, head, router) and the embedding
NOT_DECAYED = {"scale", "A_log", "dt_bias", "log_logit_scale", "gamma", "bias"}
UNSPECIFIED = {"weight"}  # the short conv's [W, C] filter (decayed, as a matrix; the design is silent)


def test_weight_decay_mask():
    model = LanguageModel(config("ham,gdn,attention,swa", router="learned", tie_embeddings=False), rngs=nnx.Rngs(0))
    mask = weight_decay_mask(model)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    params = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0])
    assert len(flat) == len(params)
    seen = set()
    for path, decays in flat:
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        label = jax.tree_util.keystr(path)
        seen.add(name)
        assert isinstance(decays, (bool, np.bool_)), (label, decays)
        if name in DECAYED:
            assert decays, f"{label} should get weight decay"
        elif name in NOT_DECAYED:
            assert not decays, f"{label} must not get weight decay"
        else:
            assert name in UNSPECIFIED, f"{label}: a parameter this test does not know"
    assert DECAYED | NOT_DECAYED <= seen, f"missing from the model: {(DECAYED | NOT_DECAYED) - seen}"
    # The learned router's biases are plain Params: they are left out by shape, not by type.
    router_biases = [p for p, _ in flat if "router_mlp" in jax.tree_util.keystr(p) and p[-1].key == "bias"]
    assert router_biases
    # The classes agree with the mask: every NoWeightDecay variable is masked out.
    variables = jax.tree_util.tree_flatten_with_path(
        nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    for (path, variable), (_, decays) in zip(variables, flat):
        if isinstance(variable, NoWeightDecay):
            assert not decays, jax.tree_util.keystr(path)
    assert not isinstance(model.ham_layers[0].threshold, nnx.Param)
    assert isinstance(model.ham_layers[0].threshold, Threshold)


# --- decoding: prefill + steps == one pass -------------------------------------------------------


@nnx.jit
def extend(model, tokens, cache):
    return model.extend(tokens, cache)


@pytest.mark.parametrize("pattern, options", [("ham", {}), ("gdn", {}), ("attention", {}), ("swa", {}), ("gdn,swa", {}),
                                              ("ham,attention", {}), ("attention,swa", CONV_ATTENTION)])
def test_prefill_then_steps_equal_the_full_forward(pattern, options):
    """Logits of one pass over a row == a prefill of its first tokens, then one token at a time
    (the recurrent forms, the attention caches wrapping their window), for every block kind."""
    model = nnx.clone(model_for(pattern, **options))
    tokens = TOKENS[1:2]  # one document of T tokens, no segments
    for i, layer in enumerate(model.ham_layers):  # tau away from every score: no rounding ties
        set_tau(layer, tau_in_gap(forward_by_layer(model, tokens, None)[1][i].scores))
    full, _ = forward(model, tokens, None)
    split = 9
    logits, cache, _ = extend(model, tokens[:, :split], model.init_cache(1, T))
    steps = [logits]
    for t in range(split, T):
        logits, cache, _ = extend(model, tokens[:, t : t + 1], cache)
        steps.append(logits)
    assert rel_rms(np.concatenate(steps, axis=1), full) <= TOL


# --- one protocol for every mixer ------------------------------------------------------------------


@pytest.mark.parametrize("kind", MIXERS)
def test_every_mixer_follows_one_call_protocol(kind):
    """init_cache(batch, max_len, capacity) and (x, *, cache, segment_ids, valid) -> (y, cache of the
    same type, MixerStats): HAM fills every stats field, the other mixers none."""
    mixer = model_for(kind).blocks[0].mixer
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, T, 32)), jnp.float32)
    cache = mixer.init_cache(2, T, None)
    assert isinstance(cache, CACHE_TYPES[kind])
    call = nnx.jit(lambda mixer, x, cache: mixer(x, cache=cache, segment_ids=None, valid=None))
    y, new_cache, stats = call(mixer, x, cache)
    assert y.shape == x.shape and type(new_cache) is type(cache) and isinstance(stats, MixerStats)
    filled = [field for field, value in stats._asdict().items() if value is not None]
    assert filled == (list(MixerStats._fields) if kind == "ham" else [])
    _, step_cache, step_stats = call(mixer, x[:, :1], new_cache)  # one more token, the decode form
    assert type(step_cache) is type(cache) and isinstance(step_stats, MixerStats)
    with pytest.raises(ValueError, match="max_len"):
        mixer.init_cache(2, 0)


def test_extend_names_the_cache_that_does_not_fit():
    model = model_for("ham,attention")
    cache = model.init_cache(1, T)
    assert isinstance(cache, ModelCache) and len(cache.layers) == 2
    tokens = TOKENS[:1, :4]
    with pytest.raises(TypeError, match="must be a ModelCache"):
        model.extend(tokens, tuple(cache.layers))
    with pytest.raises(TypeError, match=r"cache.layers\[1\] is a HAMCache, but layer 1 is 'attention'"):
        model.extend(tokens, ModelCache((cache.layers[0], cache.layers[0])))
    with pytest.raises(ValueError, match="holds 1 layers' caches, the model has 2"):
        model.extend(tokens, ModelCache(cache.layers[:1]))
