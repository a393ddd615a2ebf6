"""Generation with the hybrid cache: prompts of different lengths in one batch, a parallel prefill,
then a decode loop (`lax.while_loop`) that runs one token at a time in recurrent form.

Prompts are left-padded to a common length P (a multiple of `PROMPT_BUCKET` unless given), and each
row's caches start at position -(padding), so every prompt's first token sits at position 0 and
padding never enters an RNN state or a KV cache: a row decodes exactly as it would alone. One
compiled program serves every batch of the same size, P and settings, however full the caches get.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hamjax import ops
from hamjax.generate.memory import kv_entry_bytes
from hamjax.generate.sampling import SamplingConfig, sample
from hamjax.nn.attention import AttentionCache
from hamjax.nn.ham import HAMCache
from hamjax.nn.model import LanguageModel, ModelCache
from hamjax.ops import validation

PROMPT_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """How the HAM layers' KV caches behave at inference.

    capacity: KV slots per row, layer and head (None: the model's, as in training).
    evict: when a cache is full, a token with score > tau replaces the least-surprising entry if it
      is more surprising (False: stop admitting, the training rule). Eviction runs one token at a
      time, so with it the prompt is also fed token by token.
    tau: one threshold for every HAM layer instead of the trained ones.
    budget_bytes: the most KV-cache bytes one sequence may hold over all HAM layers. It sets the
      capacity to the budget's share per layer and head, and after every decoded token each layer's
      log tau moves by budget_lr * (fraction of tokens scoring above tau - capacity / (prompt + new
      tokens)), so the rate of admissions follows the pace that fills the budget at the end.
    """

    capacity: int | None = None
    evict: bool = False
    tau: float | None = None
    budget_bytes: int | None = None
    budget_lr: float = 0.05

    def __post_init__(self):
        if self.capacity is not None:
            validation.check_positive_int("capacity", self.capacity)
        if self.tau is not None:
            validation.check_positive_float("tau", self.tau)
        if self.budget_bytes is not None:
            validation.check_positive_int("budget_bytes", self.budget_bytes)
            if self.capacity is not None:
                raise ValueError("give capacity or budget_bytes, not both: the budget sets the capacity")
        validation.check_positive_float("budget_lr", self.budget_lr)

    def layer_capacity(self, model: LanguageModel) -> int | None:
        """KV slots per row, HAM layer and head (None: the model's own)."""
        if self.budget_bytes is None:
            return self.capacity
        c = model.config
        n_ham = len(model.ham_layers)
        if n_ham == 0:
            raise ValueError("budget_bytes bounds the HAM layers' KV caches, and this model has no HAM layer")
        per_slot = kv_entry_bytes(c.key_dim, c.value_dim, c.kv_cache_dtype)
        minimum = n_ham * c.heads * per_slot
        if self.budget_bytes < minimum:
            raise ValueError(
                f"budget_bytes={self.budget_bytes} is less than one KV entry per HAM layer and head "
                f"({n_ham} layers x {c.heads} heads x {per_slot} bytes = {minimum} bytes)"
            )
        return self.budget_bytes // minimum


class Generation(NamedTuple):
    """tokens [B, N] int32 (the generated ids; 0 after a row's end); lengths [B] int32 (tokens
    generated per row, a stop token included); cache (the model's caches with every prompt and
    generated token fed); logits [B, vocab] (the next token's, after the cache: continue_generation
    starts from them); taus [L_ham] or [L_ham, H] (the thresholds used last; moved by a byte
    budget); kv_fraction [L_ham] (admitted / tokens fed, prompt included, per HAM layer); fed (tokens
    fed, summed over rows)."""

    tokens: jax.Array
    lengths: jax.Array
    cache: ModelCache
    logits: jax.Array
    taus: jax.Array
    kv_fraction: jax.Array
    fed: jax.Array


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, length: int | None = None):
    """Left-pad token-id lists to one length (default: the longest, rounded up to PROMPT_BUCKET).
    Returns (tokens [B, P] int32, valid [B, P] bool)."""
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    rows = [np.asarray(p) for p in prompts]
    for i, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"prompt {i} is empty or not a flat list of token ids (shape {row.shape})")
        validation.check_token_ids(f"prompt {i}", row, vocab_size)
    longest = max(row.size for row in rows)
    length = PROMPT_BUCKET * math.ceil(longest / PROMPT_BUCKET) if length is None else length
    validation.check_positive_int("prompt length", length)
    if longest > length:
        raise ValueError(f"a prompt has {longest} tokens, more than the prompt length {length}")
    tokens = np.zeros((len(rows), length), np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        tokens[i, length - row.size :] = row
        valid[i, length - row.size :] = True
    return jnp.asarray(tokens), jnp.asarray(valid)


def start_cache(model: LanguageModel, valid, max_len: int, capacity: int | None = None) -> ModelCache:
    """Empty caches for left-padded prompts valid [B, P]: each row starts at position -(its padding),
    so its first real token is at position 0. max_len: the longest context (prompt + new tokens)."""
    start = -jnp.sum(~jnp.asarray(valid, bool), axis=1, dtype=jnp.int32)
    caches = []
    for layer in model.init_cache(valid.shape[0], max_len, capacity).layers:
        if isinstance(layer, HAMCache):
            layer = layer._replace(ham=layer.ham._replace(position=start))
        elif isinstance(layer, AttentionCache):
            layer = layer._replace(position=start)
        caches.append(layer)
    return ModelCache(tuple(caches))


def prefill(model: LanguageModel, tokens, valid, cache: ModelCache, *, taus=None, evict: bool = False):
    """Run left-padded prompts tokens, valid [B, P] into `cache`: in parallel form, or token by
    token with `evict`. Returns (logits [B, vocab] after each prompt's last token, cache,
    admitted [L_ham] (tokens admitted per HAM layer, summed over rows and heads))."""
    if not evict:
        logits, cache, stats = model.extend(tokens, cache, valid=valid, taus=taus)
        admitted = stats.kv_fraction * jnp.sum(valid) * model.config.heads
        return logits[:, -1], cache, admitted

    graphdef, params = nnx.split(model)

    def feed(i, carry):
        _, cache, admitted = carry
        step_model = nnx.merge(graphdef, params)
        logits, cache, stats = step_model.extend(tokens[:, i, None], cache, valid=valid[:, i, None], taus=taus, evict=True)
        return logits[:, 0], cache, admitted + stats.kv_fraction * jnp.sum(valid[:, i]) * model.config.heads

    n_ham = len(model.ham_layers)
    empty = (jnp.zeros((tokens.shape[0], model.config.vocab_size), jnp.float32), cache, jnp.zeros((n_ham,)))
    return jax.lax.fori_loop(0, tokens.shape[1], feed, empty)


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """The static part of a decode: max_new_tokens; sampling; stop_tokens (ids that end a row);
    evict (see CachePolicy); target (the budget controller's fraction of tokens over tau, None: tau
    stays put) and budget_lr (its step size)."""

    max_new_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    stop_tokens: tuple[int, ...] = ()
    evict: bool = False
    target: float | None = None
    budget_lr: float = 0.05


def decode(model: LanguageModel, cache: ModelCache, logits, key, taus, settings: DecodeSettings):
    """From logits [B, vocab] after the context in `cache`, sample up to settings.max_new_tokens
    tokens per row and feed each back, in a `lax.while_loop` that stops early once every row produced
    a stop token. taus [L_ham] or [L_ham, H]: the HAM thresholds to start from. Returns (tokens
    [B, N], lengths [B], cache (every sampled token fed), logits [B, vocab] after it, taus, admitted
    [L_ham] (admitted tokens, summed over rows and heads), fed (tokens fed, summed over rows))."""
    n = settings.max_new_tokens
    batch = logits.shape[0]
    stops = jnp.asarray(settings.stop_tokens, jnp.int32)
    is_stop = lambda t: jnp.any(t[:, None] == stops, axis=1) if stops.size else jnp.zeros(t.shape, bool)
    controller = ops.ThresholdConfig(target_fraction=settings.target, learning_rate=settings.budget_lr)
    graphdef, params = nnx.split(model)
    heads = model.config.heads
    n_ham = len(model.ham_layers)
    carry = (
        jnp.int32(0),
        logits,
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, n), jnp.int32),
        cache,
        key,
        ops.ThresholdState(jnp.log(jnp.asarray(taus, jnp.float32)), jnp.int32(0)),
        jnp.zeros((n_ham,), jnp.float32),
        jnp.float32(0),
    )

    def running(carry):
        i, _, done = carry[:3]
        return (i < n) & ~jnp.all(done)

    def step(carry):
        i, logits, done, lengths, tokens, cache, key, threshold, admitted, fed = carry
        live = ~done
        key, sub = jax.random.split(key)
        token = jnp.where(live, sample(logits, sub, settings.sampling), 0)
        step_model = nnx.merge(graphdef, params)
        step_logits, cache, stats = step_model.extend(
            token[:, None], cache, valid=live[:, None], taus=jnp.exp(threshold.log_tau), evict=settings.evict
        )
        logits = jnp.where(live[:, None], step_logits[:, 0], logits)  # an ended row keeps its own
        if settings.target is not None:
            measured = stats.over_tau.reshape((-1,) + (1,) * (threshold.log_tau.ndim - 1))  # [L_ham] or [L_ham, 1]
            threshold = ops.update_threshold(threshold, measured, controller)
        live_count = jnp.sum(live)
        return (
            i + 1, logits, done | (live & is_stop(token)), lengths + live, tokens.at[:, i].set(token), cache,
            key, threshold, admitted + stats.kv_fraction * live_count * heads, fed + live_count,
        )

    _, logits, _, lengths, tokens, cache, _, threshold, admitted, fed = jax.lax.while_loop(running, step, carry)
    return tokens, lengths, cache, logits, jnp.exp(threshold.log_tau), admitted, fed


def _generate(graphdef, params, tokens, valid, key, taus, settings: DecodeSettings, capacity):
    """The whole generation as one pure function (compiled once per shapes and settings)."""
    model = nnx.merge(graphdef, params)
    max_len = tokens.shape[1] + settings.max_new_tokens
    cache = start_cache(model, valid, max_len, capacity)
    logits, cache, prompt_admitted = prefill(model, tokens, valid, cache, taus=taus, evict=settings.evict)
    new, lengths, cache, logits, taus, admitted, fed = decode(model, cache, logits, key, taus, settings)
    fed = jnp.sum(valid) + fed
    return Generation(new, lengths, cache, logits, taus, (prompt_admitted + admitted) / (fed * model.config.heads), fed)


def _continue(graphdef, params, previous: Generation, key, settings: DecodeSettings):
    """continue_generation as one pure function."""
    model = nnx.merge(graphdef, params)
    new, lengths, cache, logits, taus, admitted, fed = decode(
        model, previous.cache, previous.logits, key, previous.taus, settings
    )
    heads = model.config.heads
    admitted = admitted + previous.kv_fraction * previous.fed * heads
    fed = previous.fed + fed
    return Generation(new, lengths, cache, logits, taus, admitted / (fed * heads), fed)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, settings: DecodeSettings, capacity):
    return jax.jit(functools.partial(_generate, graphdef, settings=settings, capacity=capacity))


@functools.lru_cache(maxsize=32)
def _compiled_continue(graphdef, settings: DecodeSettings):
    return jax.jit(functools.partial(_continue, graphdef, settings=settings))


def generate(
    model: LanguageModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    policy: CachePolicy = CachePolicy(),
    prompt_length: int | None = None,
) -> Generation:
    """Continue each prompt (a list of token ids; lengths may differ) by up to `max_new_tokens`
    tokens. Greedy unless `sampling` says otherwise; `seed` fixes the draws; a row ends at its first
    stop token. `prompt_length` (default: the longest prompt rounded up to PROMPT_BUCKET) is the
    padded length P: calls with the same batch size, P and settings reuse one compiled program.
    """
    validation.check_positive_int("max_new_tokens", max_new_tokens)
    vocab = model.config.vocab_size
    stop_tokens = tuple(int(t) for t in stop_tokens)
    validation.check_token_ids("stop_tokens", np.asarray(stop_tokens, np.int64), vocab)
    tokens, valid = pad_prompts(prompts, vocab, prompt_length)
    capacity = policy.layer_capacity(model)
    target = None
    if policy.budget_bytes is not None:
        target = min(1.0, capacity / (tokens.shape[1] + max_new_tokens))
    settings = DecodeSettings(max_new_tokens, sampling, stop_tokens, policy.evict, target, policy.budget_lr)
    n_ham = len(model.ham_layers)
    taus = model.taus() if policy.tau is None else jnp.full((n_ham,), policy.tau, jnp.float32)
    graphdef, params = nnx.split(model)
    run = _compiled(graphdef, settings, capacity)
    return run(params, tokens, valid, jax.random.key(seed), taus)


def continue_generation(
    model: LanguageModel,
    previous: Generation,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    evict: bool = False,
) -> Generation:
    """Generate up to `max_new_tokens` more tokens per row after `previous` (from generate or
    continue_generation), every row resuming after its last token, a stop token included. Greedy,
    the result is what one longer generation would have given. The thresholds stay at
    previous.taus (a byte budget's controller is not carried on); full-attention caches grow to
    hold the new tokens. Returns the new tokens only; kv_fraction and fed count every token fed."""
    validation.check_positive_int("max_new_tokens", max_new_tokens)
    stop_tokens = tuple(int(t) for t in stop_tokens)
    validation.check_token_ids("stop_tokens", np.asarray(stop_tokens, np.int64), model.config.vocab_size)
    cache = _with_room(model, previous.cache, max_new_tokens)
    settings = DecodeSettings(max_new_tokens, sampling, stop_tokens, evict)
    graphdef, params = nnx.split(model)
    run = _compiled_continue(graphdef, settings)
    return run(params, previous._replace(cache=cache), jax.random.key(seed))


def _with_room(model: LanguageModel, cache: ModelCache, new_tokens: int) -> ModelCache:
    """`cache` with every attention layer grown to at least min(window, context + new_tokens) slots,
    so that full attention drops none of its entries."""
    layers = []
    for block, layer in zip(model.blocks, cache.layers):
        if isinstance(layer, AttentionCache):
            needed = int(jnp.max(layer.position)) + new_tokens
            slots = min(block.mixer.window or needed, needed)
            layer = layer.resized(slots) if slots > layer.keys.shape[2] else layer
        layers.append(layer)
    return ModelCache(tuple(layers))
