"""Decode speed and cache memory at long contexts: HAM (KV fraction 0.25) vs a Transformer vs GDN.

    python experiments/bench_decode.py            # contexts {2048, 8192, 32768}, 32 new tokens, B=1
    python experiments/bench_decode.py --quick    # seconds, for the tests

Three models of the same width and depth (the small preset: d_model 128, 4 layers, 2 heads,
K = V = 64; `hamjax.nn.ModelConfig` defaults), differing only in their token mixers:
- HAM (pattern "ham") with capacity ceil(0.25 * context) KV slots per layer and head, its
  default threshold (tau_init);
- Transformer (pattern "attention"): full attention, a cache of context + new-token slots;
- GDN (pattern "gdn"): fixed-size RNN and conv states only.

Each model decodes greedily (`hamjax.generate.decode`, no stop tokens, compiled once per shape)
from a cache at the state it would have after `context` tokens. The caches are built
synthetically, not by a prefill (which would cost T x T per attention layer at 32k): batch 1,
positions 0..context-1; attention: every slot below the context filled, position = context;
HAM: ceil(0.25 * context) entries (a full cache, so the decode admits nothing more) at sorted
random distinct positions < context per head, random unit keys, random values and scores;
RNN and conv states random with modest norm. A decode step's cost depends on these shapes, not
on the values, so the comparison is fair; HAM's step cost grows with its capacity, not with the
context.

`decode` samples the first new token from the given logits and then runs N - 1 model steps, so
seconds per token is a call's time over N - 1; a call also copies its (undonated) input cache
once, a cost of about one step spread over the N - 1 steps. The three models run interleaved
(`median_times`). Both the Transformer's step (`nn.Attention` with an `AttentionCache`) and HAM's
write the new entry into their cache in place and read the cache where it lies.
Reported per context: seconds per token and tokens/s per model, the
Transformer-over-HAM and Transformer-over-GDN ratios of time per token, and the allocated KV
bytes and fixed state bytes of each model's cache (`hamjax.generate.cache_memory`, summed over
layers), with HAM's KV bytes over the Transformer's.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hamjax.bench.common import median_times, parse_args, save_results
from hamjax.generate import DecodeSettings, SamplingConfig, cache_memory, decode
from hamjax.nn import LanguageModel, ModelCache, ModelConfig
from hamjax.nn.attention import AttentionCache
from hamjax.nn.gdn import GDNCache
from hamjax.nn.ham import HAMCache

DEFAULT_OUTPUT = "runs/bench/decode.json"
KV_FRACTION = 0.25
NEW_TOKENS = 32
QUICK_NEW_TOKENS = 4
PATTERNS = {"ham": "ham", "transformer": "attention", "gdn": "gdn"}
STATE_STD = 0.05  # RNN state entries: a [64, 64] state of Frobenius norm about 3


def ham_capacity(context: int) -> int:
    return math.ceil(KV_FRACTION * context)


def random_rnn(rng, shape):
    return jnp.asarray(STATE_STD * rng.standard_normal(shape, dtype=np.float32))


def random_conv(rng, shape):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))


def fill_attention(cache: AttentionCache, context: int, rng) -> AttentionCache:
    """Slots 0..context-1 hold positions 0..context-1 (the rest stay empty for the new tokens)."""
    batch, heads, slots, dim = cache.keys.shape
    positions = np.where(np.arange(slots) < context, np.arange(slots), -1).astype(np.int32)
    return AttentionCache(
        keys=jnp.asarray(rng.standard_normal((batch, heads, slots, dim), dtype=np.float32)),
        values=jnp.asarray(rng.standard_normal((batch, heads, slots, dim), dtype=np.float32)),
        positions=jnp.asarray(np.broadcast_to(positions, (batch, heads, slots))),
        position=jnp.full((batch,), context, jnp.int32),
        conv=None if cache.conv is None else random_conv(rng, cache.conv.shape),
    )


def fill_ham(cache: HAMCache, context: int, rng, tau: float) -> HAMCache:
    """A full KV cache of entries at sorted distinct random positions < context, per head."""
    kv = cache.ham.cache
    batch, heads, capacity, key_dim = kv.keys.shape
    count = min(capacity, context)
    keys = rng.standard_normal(kv.keys.shape, dtype=np.float32)
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    positions = np.full((batch, heads, capacity), -1, np.int32)
    for b in range(batch):
        for h in range(heads):
            positions[b, h, :count] = np.sort(rng.choice(context, size=count, replace=False))
    occupied = np.arange(capacity) < count
    kv = kv._replace(
        keys=jnp.asarray(np.where(occupied[:, None], keys, 0.0)),
        values=jnp.asarray(np.where(occupied[:, None], rng.standard_normal(kv.values.shape, dtype=np.float32), 0.0)),
        positions=jnp.asarray(positions),
        scores=jnp.asarray(np.where(occupied, tau + rng.exponential(size=kv.scores.shape), 0.0).astype(np.float32)),
        count=jnp.full((batch, heads), count, jnp.int32),
    )
    ham = cache.ham._replace(
        rnn=random_rnn(rng, cache.ham.rnn.shape), cache=kv, position=jnp.full((batch,), context, jnp.int32)
    )
    return HAMCache(ham, random_conv(rng, cache.conv.shape))


def synthetic_cache(model: LanguageModel, context: int, new_tokens: int, seed: int = 0) -> ModelCache:
    """The model's decode cache for one row as it would stand after `context` tokens."""
    rng = np.random.default_rng(seed)
    empty = model.init_cache(1, context + new_tokens, ham_capacity(context))
    tau = float(np.min(model.taus())) if model.ham_layers else 0.0  # stored scores: above the threshold
    layers = []
    for layer in empty.layers:
        if isinstance(layer, AttentionCache):
            layers.append(fill_attention(layer, context, rng))
        elif isinstance(layer, HAMCache):
            layers.append(fill_ham(layer, context, rng, tau))
        elif isinstance(layer, GDNCache):
            layers.append(GDNCache(random_rnn(rng, layer.rnn.shape), random_conv(rng, layer.conv.shape)))
        else:
            raise TypeError(f"no synthetic fill for a {type(layer).__name__}")
    return ModelCache(tuple(layers))


def _decode_tokens(graphdef, params, cache, logits, key, taus, settings):
    tokens, *_ = decode(nnx.merge(graphdef, params), cache, logits, key, taus, settings)
    return tokens


def decode_runner(model: LanguageModel, cache: ModelCache, new_tokens: int):
    """A call that decodes `new_tokens` greedy tokens from `cache` (compiled on first use)."""
    graphdef, params = nnx.split(model)
    settings = DecodeSettings(new_tokens, SamplingConfig())
    run = jax.jit(functools.partial(_decode_tokens, graphdef, settings=settings))
    logits = jnp.zeros((1, model.config.vocab_size), jnp.float32)
    key, taus = jax.random.key(0), model.taus()
    return lambda: jax.block_until_ready(run(params, cache, logits, key, taus))


def memory(model: LanguageModel, cache: tuple, context: int) -> dict:
    layers = cache_memory(model, cache, context)
    return {
        "kv_bytes": sum(m.kv_bytes for m in layers),
        "state_bytes": sum(m.state_bytes for m in layers),
        "entries": sum(m.entries for m in layers),
    }


def main(argv=None):
    lengths, repeats, output, quick = parse_args(argv, __doc__, DEFAULT_OUTPUT, [2048, 8192, 32768], 3, [256], 1)
    new_tokens = QUICK_NEW_TOKENS if quick else NEW_TOKENS
    steps = new_tokens - 1
    models = {name: LanguageModel(ModelConfig(pattern=p), rngs=nnx.Rngs(0)) for name, p in PATTERNS.items()}
    rows = []
    print(f"{'context':>8} " + " ".join(f"{n + ' tok/s':>16}" for n in models)
          + f" {'T/HAM':>6} {'T/GDN':>6} {'HAM KV MB':>10} {'T KV MB':>9} {'HAM/T KV':>8}", flush=True)
    for context in lengths:
        caches = {name: synthetic_cache(model, context, new_tokens) for name, model in models.items()}
        mem = {name: memory(models[name], caches[name], context) for name in models}
        runners = {name: decode_runner(models[name], caches[name], new_tokens) for name in models}
        times = median_times(runners, repeats)
        per_token = {name: s / steps for name, s in times.items()}
        row = {
            "context": context,
            "new_tokens": new_tokens,
            "steps": steps,
            "ham_capacity": ham_capacity(context),
            "seconds_per_token": per_token,
            "tokens_per_s": {name: 1.0 / s for name, s in per_token.items()},
            "transformer_over_ham": per_token["transformer"] / per_token["ham"],
            "transformer_over_gdn": per_token["transformer"] / per_token["gdn"],
            "kv_bytes": {name: m["kv_bytes"] for name, m in mem.items()},
            "state_bytes": {name: m["state_bytes"] for name, m in mem.items()},
            "kv_entries": {name: m["entries"] for name, m in mem.items()},
            "ham_kv_bytes_over_transformer": mem["ham"]["kv_bytes"] / mem["transformer"]["kv_bytes"],
        }
        rows.append(row)
        kv_mb = {name: m["kv_bytes"] / 1e6 for name, m in mem.items()}
        print(f"{context:>8} " + " ".join(f"{row['tokens_per_s'][n]:>16.1f}" for n in models)
              + f" {row['transformer_over_ham']:>6.2f} {row['transformer_over_gdn']:>6.2f}"
              f" {kv_mb['ham']:>10.2f} {kv_mb['transformer']:>9.2f} {row['ham_kv_bytes_over_transformer']:>8.3f}",
              flush=True)
        del caches, runners
    c = ModelConfig()
    return save_results(
        f"greedy decode from a synthetic cache at each context, B=1: HAM (capacity ceil({KV_FRACTION} context)) "
        f"vs Transformer (full attention) vs GDN; d_model {c.d_model}, {c.n_layers} layers, {c.heads} heads, "
        f"K=V={c.key_dim}",
        rows,
        repeats,
        output,
        kv_fraction=KV_FRACTION,
        new_tokens=new_tokens,
    )



def summary(result: dict) -> str:
    """Per context: milliseconds per token per model, the Transformer's time over HAM's and GDN's,
    KV MiB and HAM's KV bytes over the Transformer's."""
    names = list(result["rows"][0]["seconds_per_token"])
    lines = [
        "| context | " + " | ".join(f"{n} ms / token" for n in names)
        + " | Transformer / HAM time | Transformer / GDN time | HAM KV MiB | Transformer KV MiB | HAM / Transformer KV |",
        "|---" * (len(names) + 6) + "|",
    ]
    for row in result["rows"]:
        kv = row["kv_bytes"]
        lines.append(
            f"| {row['context']} | " + " | ".join(f"{1e3 * row['seconds_per_token'][n]:.2f}" for n in names)
            + f" | {row['transformer_over_ham']:.2f}x | {row['transformer_over_gdn']:.2f}x | {kv['ham'] / 2**20:.2f}"
            f" | {kv['transformer'] / 2**20:.2f} | {row['ham_kv_bytes_over_transformer']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
