"""hamjax.generate: batched prompts of different lengths == one at a time, prefill logits == the full
forward, greedy determinism, one trace for the whole decode, stop tokens, cache policies (capacity,
eviction, threshold override, byte budget), the memory report, bad input, and `hamjax generate`."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hamjax.cli.main import main
from hamjax.generate import generation
from hamjax.generate import (
    CachePolicy,
    SamplingConfig,
    cache_memory,
    continue_generation,
    generate,
    kv_entry_bytes,
    pad_prompts,
    prefill,
    start_cache,
)
from hamjax.nn import LanguageModel, ModelConfig
from hamjax.nn.attention import AttentionCache
from hamjax.nn.ham import HAMCache
from hamjax.train import Checkpoints, preset
from hamjax.train.loop import build
from hamjax.train.run_folder import prepare_run_folder
from oracles import rel_rms

VOCAB, HEADS, KEY_DIM = 64, 2, 16
NEW = 8  # tokens generated per test
PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(0, VOCAB, n)] for i, n in enumerate((5, 17, 11))]
TOL = 1e-5  # relative RMS error in float32


def config(pattern: str, **kwargs) -> ModelConfig:
    """A tiny 2-layer model; window 4 and capacity 6 are smaller than the contexts, so sliding windows
    wrap and HAM caches fill."""
    values = dict(
        vocab_size=VOCAB, d_model=32, n_layers=2, pattern=pattern, heads=HEADS, key_dim=KEY_DIM, value_dim=KEY_DIM,
        capacity=6, window=4, chunk_size=8, tau_init=0.3,
    )
    return ModelConfig(**(values | kwargs))


_models: dict[tuple, LanguageModel] = {}


def model_for(pattern: str, **kwargs) -> LanguageModel:
    key = (pattern, *sorted(kwargs.items()))
    if key not in _models:
        _models[key] = LanguageModel(config(pattern, **kwargs), rngs=nnx.Rngs(0))
    return _models[key]


def ham_counts(cache) -> list[np.ndarray]:
    return [np.asarray(layer.ham.cache.count) for layer in cache.layers if hasattr(layer, "ham")]


# --- batched prompts of different lengths ----------------------------------------------------------


@pytest.mark.parametrize("pattern", ["ham,attention", "gdn,swa"])  # every block kind
def test_batched_prompts_equal_one_at_a_time(pattern):
    """Left-padded prompts of lengths 5, 17, 11 decode to the same tokens, with the same HAM cache
    counts, as each prompt alone without any padding."""
    model = model_for(pattern)
    batch = generate(model, PROMPTS, max_new_tokens=NEW, prompt_length=24)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], max_new_tokens=NEW, prompt_length=len(prompt))
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])
        for counts_batch, counts_alone in zip(ham_counts(batch.cache), ham_counts(alone.cache)):
            np.testing.assert_array_equal(counts_batch[row], counts_alone[0])
    assert len(set(map(tuple, np.asarray(batch.tokens)))) > 1  # the rows really differ


@pytest.mark.parametrize("pattern, options", [("ham", {}), ("gdn,swa", {}), ("attention", {}),
                                              ("attention", dict(attention_conv=True))])
def test_padded_prefill_logits_equal_the_full_forward(pattern, options):
    """The logits after each left-padded prompt == the last logits of a plain forward pass over it
    (a short conv before attention skips the padding too)."""
    model = model_for(pattern, **options)
    tokens, valid = pad_prompts(PROMPTS, VOCAB, 24)
    cache = start_cache(model, valid, 24)
    logits, _, _ = nnx.jit(prefill)(model, tokens, valid, cache)
    forward = nnx.jit(lambda model, tokens: model(tokens)[0])
    for row, prompt in enumerate(PROMPTS):
        full = forward(model, jnp.asarray([prompt], jnp.int32))
        assert rel_rms(logits[row], full[0, -1]) <= TOL


def test_stepwise_prefill_equals_parallel_prefill_while_nothing_is_evicted():
    """With eviction the prompt is fed token by token; while no cache overflows that is the same
    computation as the parallel prefill."""
    model = model_for("ham,attention", capacity=64)
    tokens, valid = pad_prompts(PROMPTS, VOCAB, 24)
    cache = start_cache(model, valid, 24)
    run = nnx.jit(prefill, static_argnames="evict")
    parallel, cache_p, admitted_p = run(model, tokens, valid, cache)
    stepwise, cache_s, admitted_s = run(model, tokens, valid, cache, evict=True)
    assert rel_rms(stepwise, parallel) <= TOL
    np.testing.assert_allclose(admitted_s, admitted_p, rtol=1e-6)
    np.testing.assert_array_equal(ham_counts(cache_s)[0], ham_counts(cache_p)[0])
    assert ham_counts(cache_p)[0].max() > 0


# --- determinism, tracing, stop tokens -------------------------------------------------------------


def test_greedy_is_deterministic_and_sampling_follows_the_seed():
    model = model_for("ham")
    first, second = (generate(model, PROMPTS, max_new_tokens=NEW) for _ in range(2))
    np.testing.assert_array_equal(first.tokens, second.tokens)
    hot = SamplingConfig(temperature=1.0, top_k=20)
    a, b, c = (generate(model, PROMPTS, max_new_tokens=NEW, sampling=hot, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_the_decode_loop_traces_once(monkeypatch):
    """Prompts of other lengths (same padded length) and caches filled to other levels reuse one
    trace of the whole generation: prefill, while_loop and sampling."""

    monkeypatch.setattr(generation, "_generate", chex.assert_max_traces(generation._generate, n=1))
    generation._compiled.cache_clear()
    model = model_for("ham", capacity=3)
    fills = set()
    for prompt in ([1, 2], PROMPTS[1], PROMPTS[0] * 3, PROMPTS[2]):
        out = generate(model, [prompt], max_new_tokens=NEW, prompt_length=32)
        fills.add(tuple(int(c.sum()) for c in ham_counts(out.cache)))
    assert len(fills) > 1  # the caches really were filled to different levels
    generation._compiled.cache_clear()


@pytest.mark.parametrize("pattern", ["ham,attention", "gdn,swa"])  # every block kind
def test_a_generation_continues_as_one_longer_generation(pattern):
    """Greedy: NEW tokens, then 5 more from the Generation (its cache holds every token, the last
    sampled one included, and its logits what comes next; full attention grows its cache) == NEW + 5
    at once; so do the caches, the logits and the KV fraction."""
    model = model_for(pattern)
    whole = generate(model, PROMPTS, max_new_tokens=NEW + 5)
    first = generate(model, PROMPTS, max_new_tokens=NEW)
    more = continue_generation(model, first, max_new_tokens=5)
    np.testing.assert_array_equal(np.concatenate([first.tokens, more.tokens], axis=1), whole.tokens)
    np.testing.assert_array_equal(first.lengths + more.lengths, whole.lengths)
    assert int(more.fed) == int(whole.fed) == sum(map(len, PROMPTS)) + len(PROMPTS) * (NEW + 5)
    assert rel_rms(more.logits, whole.logits) <= TOL
    np.testing.assert_allclose(more.kv_fraction, whole.kv_fraction, rtol=1e-6)
    for got, want in zip(more.cache.layers, whole.cache.layers):
        if isinstance(got, HAMCache):
            np.testing.assert_array_equal(got.ham.cache.count, want.ham.cache.count)
            np.testing.assert_array_equal(got.ham.position, want.ham.position)
        elif isinstance(got, AttentionCache):
            np.testing.assert_array_equal(got.position, want.position)
        else:
            assert rel_rms(got.rnn, want.rnn) <= TOL


def test_stop_tokens_end_each_row():
    model = model_for("gdn")
    free = generate(model, PROMPTS, max_new_tokens=NEW)
    stop = int(free.tokens[1, 2])  # row 1 produces it as its third token
    out = generate(model, PROMPTS, max_new_tokens=NEW, stop_tokens=[stop])
    for row in range(len(PROMPTS)):
        tokens = list(np.asarray(free.tokens[row]))
        expected = tokens.index(stop) + 1 if stop in tokens else NEW
        assert int(out.lengths[row]) == expected
        np.testing.assert_array_equal(out.tokens[row, :expected], free.tokens[row, :expected])
        assert not np.any(out.tokens[row, expected:])
    assert int(out.lengths[1]) <= 3


def test_a_row_that_stopped_keeps_the_logits_after_its_last_token():
    """The Generation's logits of a row that ended are those after its stop token (what a
    continuation samples from), not after the padding fed while the other rows ran on."""
    model = model_for("gdn")
    free = generate(model, PROMPTS, max_new_tokens=NEW)
    stop = int(free.tokens[1, 2])
    out = generate(model, PROMPTS, max_new_tokens=NEW, stop_tokens=[stop])
    row = 1
    assert int(out.lengths[row]) < int(jnp.max(out.lengths))  # it ended while another row went on
    context = PROMPTS[row] + [int(t) for t in out.tokens[row, : int(out.lengths[row])]]
    assert rel_rms(out.logits[row], _next_logits(model, context)) <= TOL


def _next_logits(model, context):
    """The logits after `context` [N] by one plain forward pass."""
    logits, _ = model(jnp.asarray([context], jnp.int32))
    return logits[0, -1]


# --- cache policies --------------------------------------------------------------------------------


def test_capacity_override_bounds_every_ham_cache():
    model = model_for("ham")
    out = generate(model, PROMPTS, max_new_tokens=NEW, policy=CachePolicy(capacity=2))
    for layer in out.cache.layers:
        assert layer.ham.cache.capacity == 2
        assert int(layer.ham.cache.count.max()) == 2


def test_eviction_keeps_the_cache_full_of_the_most_surprising_entries():
    """With a 2-slot cache and eviction, more tokens are admitted than fit, the caches stay at
    capacity, and each keeps the two highest scores it was offered (kept scores >= any score it
    admitted and lost, checked through its admitted count and the scores it still holds)."""
    model = model_for("ham", tau_init=0.05)
    policy = CachePolicy(capacity=2, evict=True)
    out = generate(model, PROMPTS, max_new_tokens=NEW, policy=policy)
    total = sum(len(p) for p in PROMPTS) + int(out.lengths.sum()) - len(PROMPTS)
    for i, layer in enumerate(out.cache.layers):
        kv = layer.ham.cache
        np.testing.assert_array_equal(kv.count, 2)
        admitted = float(out.kv_fraction[i]) * total * HEADS
        assert admitted > 2 * len(PROMPTS) * HEADS  # evictions happened
        assert np.all(np.asarray(kv.positions) >= 0)
    stop_admitting = generate(model, PROMPTS, max_new_tokens=NEW, policy=CachePolicy(capacity=2))
    assert np.all(np.asarray(out.kv_fraction) > np.asarray(stop_admitting.kv_fraction))


def test_threshold_override_sets_the_kv_fraction():
    model = model_for("ham", capacity=64)
    fractions = [
        np.asarray(generate(model, PROMPTS, max_new_tokens=NEW, policy=CachePolicy(tau=tau)).kv_fraction)
        for tau in (1e-6, 0.3, 1e6)
    ]
    np.testing.assert_allclose(fractions[0], 1.0)
    np.testing.assert_array_equal(fractions[2], 0.0)
    assert np.all(fractions[0] >= fractions[1]) and np.all(fractions[1] >= fractions[2])
    assert 0 < fractions[1].mean() < 1


def test_byte_budget_caps_the_cache_and_moves_tau():
    """A budget of 3 entries per layer and head: the caches are allocated at 3 slots (within the
    budget), and with a low starting tau the controller raises tau while the cache fills too fast."""
    model = model_for("ham", tau_init=0.01)
    entry = kv_entry_bytes(KEY_DIM, KEY_DIM)
    budget = 3 * 2 * HEADS * entry + entry - 1  # not a multiple: rounds down to 3 slots
    out = generate(model, PROMPTS, max_new_tokens=NEW, policy=CachePolicy(budget_bytes=budget, budget_lr=0.5))
    context = 24 + NEW
    held = sum(layer.kv_bytes for layer in cache_memory(model, out.cache, context))
    assert held <= budget
    assert all(layer.ham.cache.capacity == 3 for layer in out.cache.layers)
    assert np.all(np.asarray(out.taus) > 0.01)


# --- the memory report -----------------------------------------------------------------------------


def test_cache_memory_counts_entries_and_bytes():
    ham = model_for("ham,attention")
    out = generate(ham, [PROMPTS[1]], max_new_tokens=NEW, prompt_length=17)
    context = 17 + NEW  # every token was fed, the last generated one included
    layers = cache_memory(ham, out.cache, context)
    assert [layer.kind for layer in layers] == ["ham", "attention"]
    assert layers[0].entries == int(out.cache.layers[0].ham.cache.count.sum())
    assert layers[0].slots == 6 * HEADS
    assert layers[0].entry_bytes == (2 * KEY_DIM) * 4 + 8
    assert layers[0].state_bytes > 0
    # A full-attention layer holds every token: its bytes held are what the report compares with.
    assert layers[1].entries == context * HEADS
    assert layers[1].used_bytes == layers[1].full_attention_bytes == context * HEADS * (2 * KEY_DIM * 4 + 4)
    assert layers[1].state_bytes == 0


def test_cache_memory_counts_an_attention_conv_as_state_not_as_entries():
    model = model_for("attention", attention_conv=True)
    width = model.config.conv_width
    for layer in cache_memory(model, model.init_cache(1, 16), context=0):
        assert layer.entry_bytes == 2 * KEY_DIM * 4 + 4 and layer.entries == 0
        assert layer.state_bytes == (width - 1) * 3 * HEADS * KEY_DIM * 4


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([], {}, "non-empty list"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1, VOCAB]], {}, f"id {VOCAB} outside the vocabulary"),
        ([[-1, 2]], {}, "id -1 outside"),
        ([[1] * 10], {"prompt_length": 8}, "more than the prompt length 8"),
        ([[1]], {"stop_tokens": [VOCAB + 3]}, "outside the vocabulary"),
        ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([[1]], {"policy": CachePolicy(budget_bytes=100)}, "less than one KV entry"),
    ],
)
def test_bad_input_is_refused(prompts, kwargs, message):
    kwargs = {"max_new_tokens": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model_for("ham"), prompts, **kwargs)


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match="not both"):
        CachePolicy(capacity=4, budget_bytes=10_000)
    with pytest.raises(ValueError, match="tau"):
        CachePolicy(tau=-1.0)
    with pytest.raises(ValueError, match="no HAM layer"):
        generate(model_for("attention"), [[1]], max_new_tokens=2, policy=CachePolicy(budget_bytes=10_000))


# --- hamjax generate -------------------------------------------------------------------------------


def save_run(run_dir: pathlib.Path, **model_fields):
    """A run folder with a step-0 checkpoint of the tiny preset (no training needed)."""
    config = preset("tiny")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, **model_fields), run_dir=str(run_dir))
    prepare_run_folder(config)
    model, optimizer = build(config)
    checkpoints = Checkpoints(run_dir / "checkpoints", async_save=False)
    checkpoints.save(0, model, optimizer, {"step": 0})
    checkpoints.close()
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("generate") / "run"
    save_run(path)
    return path


def test_cli_generate_prints_text_and_cache_report(run_dir, capsys):
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "In the beginning", "--prompt", "And",
                 "--max_new_tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "In the beginning" in out and "--- prompt 2 (3 tokens) + 6 generated ---" in out
    assert "full attention" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:2] in (["0", "ham"], ["1", "ham"])]
    assert len(rows) == 4  # two layers, two prompts


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", ""], "--prompt 1 is empty"),
        (["--prompt", "x", "--budget_bytes", "10"], "less than one KV entry"),
        (["--prompt", "x", "--stop", "ab"], "a stop must be exactly one token"),
        (["--prompt", "x", "--top_p", "2"], "top_p must be in"),
    ],
)
def test_cli_generate_bad_input(run_dir, capsys, flags, message):
    assert main(["generate", "--checkpoint", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_generate_refuses_a_checkpoint_of_another_config(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    save_run(other, d_model=48)
    mixed = tmp_path / "mixed"
    shutil.copytree(run_dir, mixed)
    shutil.copy(other / "config.json", mixed / "config.json")  # config of one run, checkpoint of another
    assert json.loads((mixed / "config.json").read_text())["model"]["d_model"] == 48
    assert main(["generate", "--checkpoint", str(mixed), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "another config" in err


def test_cli_generate_missing_run(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no run found" in capsys.readouterr().err
