"""The language model: token embedding, a stack of pre-norm blocks whose token mixers follow a
pattern (HAM, GDN, full or sliding-window attention), SwiGLU MLPs, a final RMSNorm and the LM head."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hamjax import ops
from hamjax.nn.attention import Attention, AttentionCache
from hamjax.nn.gdn import GatedDeltaNet, GDNCache
from hamjax.nn.ham import HAM, ROUTERS, HAMCache
from hamjax.nn.mlp import SwiGLU
from hamjax.nn.norm import RMSNorm
from hamjax.ops import validation
from hamjax.ops.ham import ATTENTION_PATHS

MIXERS = ("ham", "gdn", "attention", "swa")  # swa: sliding-window attention
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model's shape (defaults: the `small` preset). `pattern` lists token mixers (comma-separated, from MIXERS) and repeats to
    fill `n_layers`: "ham" is all-HAM, "attention" a Transformer, "gdn,gdn,gdn,attention" GDN with
    every 4th layer attention, "gdn,swa" GDN interleaved with sliding-window attention.

    Attention layers use `heads` heads of size `key_dim`. HAM: `capacity` KV slots per row and head,
    `router`, and the threshold (tau_init; kv_target None keeps tau fixed, otherwise the controller
    moves log tau by tau_lr * (fraction of tokens over tau - target) each training step after
    tau_freeze_steps, within [tau_min, tau_max]; tau_per_head: one tau per head instead of per layer).
    mlp_hidden None: 8/3 d_model rounded up to a multiple of 32. ham_attention: "compacted"
    (blockwise over a buffer of the admitted tokens: the fastest, by `hamjax bench` packed_step)
    or "dense" (the T x T reference). conv_width: the short causal convolution of GDN and HAM over
    their q, k, v; attention_conv: attention and sliding-window layers get one too (off: a plain
    Transformer; on: Zoology's stronger attention baseline). dtype: the activations and matmul inputs ("float32" or
    "bfloat16"); param_dtype: the weights' storage ("float32"); cache_dtype: the keys and values of
    the HAM and attention KV caches, in training and decoding (None: dtype's; "bfloat16" halves
    their bytes; `kv_cache_dtype` resolves it). The precision policy in the README says what stays
    float32 whatever dtype is (state, gates, routing, softmax, norms, logits, loss).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    pattern: str = "ham"
    heads: int = 2
    key_dim: int = 64
    value_dim: int = 64
    mlp_hidden: int | None = None
    window: int = 128
    capacity: int = 512
    router: str = "surprise"
    tau_init: float = 0.5
    kv_target: float | None = 0.25
    tau_lr: float = 0.1
    tau_freeze_steps: int = 0
    tau_per_head: bool = False
    tau_min: float = 1e-4
    tau_max: float = 1e4
    ham_attention: str = "compacted"
    rope_theta: float | None = 10000.0
    conv_width: int = 4
    attention_conv: bool = False
    chunk_size: int = 64
    tie_embeddings: bool = True
    remat: bool = False
    norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"
    cache_dtype: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "heads", "key_dim", "value_dim", "window", "capacity",
                     "conv_width", "chunk_size"):
            validation.check_positive_int(name, getattr(self, name))
        if self.mlp_hidden is not None:
            validation.check_positive_int("mlp_hidden", self.mlp_hidden)
        for kind in self.mixers:
            if kind not in MIXERS:
                raise ValueError(f"pattern {self.pattern!r} names an unknown mixer {kind!r}; choose from {MIXERS}")
        validation.check_choice("router", self.router, ROUTERS)
        validation.check_choice("dtype", self.dtype, DTYPES)
        validation.check_choice("param_dtype", self.param_dtype, DTYPES)
        if self.cache_dtype is not None:
            validation.check_choice("cache_dtype", self.cache_dtype, DTYPES)
        validation.check_choice("ham_attention", self.ham_attention, ATTENTION_PATHS)
        for name in ("tau_init", "tau_lr", "tau_min", "tau_max"):
            validation.check_positive_float(name, getattr(self, name))
        if not self.tau_min <= self.tau_init <= self.tau_max:
            raise ValueError(
                f"tau_init={self.tau_init!r} must lie in [tau_min, tau_max] = [{self.tau_min!r}, {self.tau_max!r}]"
            )
        if self.kv_target is not None and not 0.0 < self.kv_target <= 1.0:
            raise ValueError(f"kv_target must be in (0, 1] or None, got {self.kv_target!r}")
        validation.check_nonnegative_int("tau_freeze_steps", self.tau_freeze_steps)

    @property
    def mixers(self) -> tuple[str, ...]:
        """The token mixer of each layer: `pattern` repeated to n_layers."""
        kinds = tuple(kind.strip() for kind in self.pattern.split(","))
        return tuple(kinds[i % len(kinds)] for i in range(self.n_layers))

    def kv_fractions(self, seq_len: int, ham_fractions) -> list[float]:
        """The fraction of a row's T = seq_len tokens each layer holds in its KV cache after reading the
        row: attention 1, sliding window min(window, T) / T, GDN 0, HAM the measured ham_fractions
        [L_ham] in order (e.g. ModelStats.kv_fraction)."""
        ham = iter(np.asarray(ham_fractions, np.float64).ravel().tolist())
        per_kind = {"attention": lambda: 1.0, "swa": lambda: min(self.window, seq_len) / seq_len,
                    "gdn": lambda: 0.0, "ham": lambda: next(ham)}
        return [per_kind[kind]() for kind in self.mixers]

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or 32 * math.ceil(8 * self.d_model / 3 / 32)

    @property
    def kv_cache_dtype(self) -> np.dtype:
        """The KV caches' key and value dtype: cache_dtype, or dtype where that is None."""
        return jnp.dtype(self.cache_dtype or self.dtype)

    @property
    def dtypes(self) -> dict:
        """The modules' dtype and param_dtype arguments, as NumPy dtypes."""
        return dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))

    @property
    def threshold(self) -> ops.ThresholdConfig:
        return ops.ThresholdConfig(
            self.tau_init, self.kv_target, self.tau_lr, self.tau_freeze_steps, self.tau_per_head, self.tau_min,
            self.tau_max,
        )


class ModelStats(NamedTuple):
    """Of the HAM layers, in order (L_ham of them): kv_fraction [L_ham], kv_fraction_per_head
    [L_ham, H] (admitted / valid tokens of this call); over_tau [L_ham], over_tau_per_head
    [L_ham, H] (tokens scoring above tau / valid tokens, whether or not the cache had room: what the
    controller follows); admitted [L_ham, B, T, H] bool (which tokens each head wrote to its KV
    cache)."""

    kv_fraction: jax.Array
    kv_fraction_per_head: jax.Array
    over_tau: jax.Array
    over_tau_per_head: jax.Array
    admitted: jax.Array


def make_mixer(kind: str, config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    c = config
    dtypes = c.dtypes
    if kind == "ham":
        return HAM(
            c.d_model, c.heads, c.key_dim, c.value_dim, capacity=c.capacity, router=c.router,
            threshold=c.threshold, rope_theta=c.rope_theta, attention=c.ham_attention, conv_width=c.conv_width,
            chunk_size=c.chunk_size, norm_eps=c.norm_eps, cache_dtype=c.kv_cache_dtype, rngs=rngs, **dtypes,
        )
    if kind == "gdn":
        return GatedDeltaNet(
            c.d_model, c.heads, c.key_dim, c.value_dim, conv_width=c.conv_width, chunk_size=c.chunk_size,
            norm_eps=c.norm_eps, rngs=rngs, **dtypes,
        )
    window = c.window if kind == "swa" else None
    return Attention(
        c.d_model, c.heads, c.key_dim, window=window, rope_theta=c.rope_theta,
        conv_width=c.conv_width if c.attention_conv else None, cache_dtype=c.kv_cache_dtype, rngs=rngs, **dtypes,
    )


class Block(nnx.Module):
    """x + mixer(RMSNorm(x)), then + SwiGLU(RMSNorm(.)). x [B, T, D] -> x [B, T, D]."""

    def __init__(self, kind: str, config: ModelConfig, *, rngs: nnx.Rngs):
        self.kind = kind
        self.mixer_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = make_mixer(kind, config, rngs)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_width, rngs=rngs, **config.dtypes)

    def __call__(self, x, *, cache=None, segment_ids=None, valid=None, tau=None, evict=False):
        """Returns (x, the mixer's new cache (None for attention called without one), MixerStats).
        tau and evict reach a HAM mixer only (see HAM.__call__)."""
        extras = dict(tau=tau, evict=evict) if self.kind == "ham" else {}
        h, cache, stats = self.mixer(self.mixer_norm(x), cache=cache, segment_ids=segment_ids, valid=valid, **extras)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache, stats


class ModelCache(NamedTuple):
    """The model's decode state: layers[i] is block i's mixer cache (HAMCache, GDNCache or
    AttentionCache, by the block's kind), from LanguageModel.init_cache or extend."""

    layers: tuple


CACHE_TYPES = {"ham": HAMCache, "gdn": GDNCache, "attention": AttentionCache, "swa": AttentionCache}


def _rematerialised(call):
    """call(block, *args), its activations recomputed in the backward pass: jax.checkpoint of a pure
    function of the block's state (a block call changes none of its variables). nnx.remat instead
    writes the variables back, which fails for the HAM threshold inside the training step's
    jax.value_and_grad ("Cannot mutate Threshold from a different trace level")."""

    def rematerialised(block, *args):
        graphdef, state = nnx.split(block)
        return jax.checkpoint(lambda state, *args: call(nnx.merge(graphdef, state), *args))(state, *args)

    return rematerialised


class LanguageModel(nnx.Module):
    """tokens [B, T] int -> logits [B, T, vocab] float32, and ModelStats of its HAM layers."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        std = config.d_model**-0.5  # tied head: logits of unit-RMS features start with unit scale
        self.embed = nnx.Embed(
            config.vocab_size, config.d_model, embedding_init=nnx.initializers.normal(std), rngs=rngs, **config.dtypes
        )
        self.blocks = nnx.List([Block(kind, config, rngs=rngs) for kind in config.mixers])
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = (
            None
            if config.tie_embeddings
            else nnx.Linear(
                config.d_model, config.vocab_size, use_bias=False, dtype=jnp.float32,
                param_dtype=config.dtypes["param_dtype"], rngs=rngs,
            )
        )

    @property
    def ham_layers(self) -> list[HAM]:
        return [block.mixer for block in self.blocks if block.kind == "ham"]

    def init_cache(self, batch: int, max_len: int, capacity: int | None = None) -> ModelCache:
        """Every block's empty decode cache, in order (max_len: the longest context a decode
        reaches; it sizes the full-attention caches; capacity: the HAM layers' KV slots per row and
        head, default the config's)."""
        return ModelCache(tuple(block.mixer.init_cache(batch, max_len, capacity) for block in self.blocks))

    def __call__(self, tokens, *, segment_ids=None, valid=None):
        """tokens [B, T] in [0, vocab); segment_ids [B, T] (packed documents: nothing crosses a
        boundary); valid [B, T] (False = padding). Returns (logits [B, T, vocab], ModelStats)."""
        logits, _, stats = self._forward(tokens, None, segment_ids, valid)
        return logits, stats

    def extend(self, tokens, cache: ModelCache, *, valid=None, taus=None, evict: bool = False):
        """Run tokens [B, T] after the context held in `cache` (from `init_cache` or a previous
        call): a prefill for T > 1, a decode step (the recurrent forms) for T = 1. valid [B, T]
        (False = padding: it enters no state, though positions count it); taus [L_ham] or
        [L_ham, H] overrides the HAM layers' thresholds; evict (T = 1 only): full HAM caches
        replace their least-surprising entry with a more surprising token.
        Returns (logits [B, T, vocab], the new cache, ModelStats)."""
        n_ham = len(self.ham_layers)
        if taus is not None and (jnp.ndim(taus) not in (1, 2) or jnp.shape(taus)[0] != n_ham):
            raise ValueError(f"taus must have shape [L_ham] or [L_ham, H] with L_ham = {n_ham}, got {jnp.shape(taus)}")
        self._check_cache(cache)
        logits, layers, stats = self._forward(tokens, cache.layers, None, valid, taus, evict)
        return logits, ModelCache(layers), stats

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, ModelCache):
            raise TypeError(f"cache must be a ModelCache (from init_cache or extend), got {type(cache).__name__}")
        if len(cache.layers) != len(self.blocks):
            raise ValueError(f"the cache holds {len(cache.layers)} layers' caches, the model has {len(self.blocks)}")
        for i, (block, layer) in enumerate(zip(self.blocks, cache.layers)):
            if not isinstance(layer, CACHE_TYPES[block.kind]):
                raise TypeError(
                    f"cache.layers[{i}] is a {type(layer).__name__}, but layer {i} is {block.kind!r}, "
                    f"which keeps a {CACHE_TYPES[block.kind].__name__}"
                )

    def _forward(self, tokens, layer_caches, segment_ids, valid, taus=None, evict=False):
        """Returns (logits, the blocks' new caches (a tuple), ModelStats)."""
        validation.check_rank("tokens", tokens, 2, "[B, T]")
        validation.check_token_ids("tokens", tokens, self.config.vocab_size)
        x = self.embed(tokens)
        caches = [None] * len(self.blocks) if layer_caches is None else list(layer_caches)
        call = lambda blk, x, c, tau: blk(x, cache=c, segment_ids=segment_ids, valid=valid, tau=tau, evict=evict)
        call = _rematerialised(call) if self.config.remat else call
        layer_stats = []
        for i, block in enumerate(self.blocks):
            tau = None if taus is None or block.kind != "ham" else taus[len(layer_stats)]
            x, caches[i], stats = call(block, x, caches[i], tau)
            if block.kind == "ham":
                layer_stats.append(stats)
        x = self.final_norm(x)
        return self._logits(x), tuple(caches), self._stack_stats(layer_stats, tokens.shape)

    def _logits(self, features):
        """features [B, T, D] -> logits [B, T, vocab], computed in float32 whatever the model's dtype
        (they feed the softmax of the loss and of sampling)."""
        features = features.astype(jnp.float32)
        if self.head is not None:
            return self.head(features)
        return features @ self.embed.embedding[...].astype(jnp.float32).T

    def _stack_stats(self, layer_stats: list, tokens_shape) -> ModelStats:
        """The HAM layers' MixerStats, stacked along a leading L_ham axis (empty arrays without any)."""
        if not layer_stats:
            h = self.config.heads
            empty = lambda *shape, dtype=jnp.float32: jnp.zeros((0, *shape), dtype)
            return ModelStats(empty(), empty(h), empty(), empty(h), empty(*tokens_shape, h, dtype=bool))
        stack = lambda name: jnp.stack([getattr(stats, name) for stats in layer_stats])
        return ModelStats(*(stack(name) for name in ModelStats._fields))

    def controller_signal(self, stats: ModelStats) -> jax.Array:
        """What the threshold controllers follow: stats.over_tau [L_ham], or over_tau_per_head
        [L_ham, H] with config.tau_per_head."""
        return stats.over_tau_per_head if self.config.tau_per_head else stats.over_tau

    def update_thresholds(self, over_tau) -> None:
        """One controller step for each HAM layer from its measured fraction of tokens over tau
        (`controller_signal`): [L_ham], or [L_ham, H] with config.tau_per_head."""
        for i, layer in enumerate(self.ham_layers):
            layer.update_threshold(over_tau[i])

    def taus(self) -> jax.Array:
        """The HAM layers' thresholds: [L_ham], or [L_ham, H] with config.tau_per_head."""
        return jnp.stack([layer.tau for layer in self.ham_layers]) if self.ham_layers else jnp.zeros((0,))
