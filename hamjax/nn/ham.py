"""Hybrid Associative Memory layer: a Gated DeltaNet plus attention over the tokens it routes to a KV cache.

Per head: y = W_o[(RMSNorm(o_rnn) + gamma_h * RMSNorm(o_attn)) * SiLU(z)], with
o_rnn the gated delta rule and o_attn the attention over the cached tokens with logits
lambda_h * q . k (q, k unit vectors, lambda_h = exp(log_logit_scale_h) > 0). A token enters the cache
when its routing score exceeds tau: the "surprise" router scores ||e_t|| / sqrt(V) from the RNN's
prediction error; the "learned" router scores sigmoid(MLP(x_t)) and adds log s_j to the logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hamjax import ops
from hamjax.nn.mixer import MixerStats, check_cache_size
from hamjax.nn.norm import RMSNorm
from hamjax.nn.projections import DeltaProjections
from hamjax.nn.variables import NoWeightDecay
from hamjax.ops import validation
from hamjax.ops.ham import ATTENTION_PATHS

ROUTERS = ("surprise", "learned")


class HAMCache(NamedTuple):
    """ham: ops.HamState (RNN state [B, H, K, V] fp32, KV cache [B, H, C, ...], next position [B]);
    conv [B, W-1, H(2K + V)]."""

    ham: ops.HamState
    conv: jax.Array


class Threshold(nnx.Variable):
    """The admission threshold's controller state (ops.ThresholdState: log tau, step). Not an
    nnx.Param: optimizers and nnx.grad(wrt=nnx.Param) leave it out; nnx.split/state and checkpoints
    keep it."""


class LearnedRouter(nnx.Module):
    """s = sigmoid(W_2 SiLU(W_1 x + b_1) + b_2): x [B, T, D] -> scores [B, T, H] in (0, 1), float32."""

    def __init__(self, d_model: int, heads: int, hidden: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        validation.check_positive_int("router_hidden", hidden)
        self.hidden = nnx.Linear(d_model, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out = nnx.Linear(hidden, heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return jax.nn.sigmoid(self.out(jax.nn.silu(self.hidden(x))).astype(jnp.float32))


class HAM(nnx.Module):
    """HAM layer: x [B, T, D] -> y [B, T, D], with a KV cache of `capacity` (C) slots per row and head.

    router: "surprise" or "learned" (MLP hidden width `router_hidden`, default D // 4);
    threshold: ops.ThresholdConfig, tau's initial value, its controller and whether each head has
    its own tau (see `update_threshold`);
    logit_scale_init: lambda_h's initial value (default sqrt(K)); rope_theta: RoPE base at the
    entries' original positions (None: no RoPE); attention: "compacted" (blockwise over a buffer
    of the admitted tokens: work follows them, memory linear in T) or "dense" (the T x T
    reference); chunk_size: the delta rule's chunk; dtype / param_dtype: the projections' compute
    and weight dtypes (routing, the recurrence and the softmax stay float32); cache_dtype: the KV
    cache's keys and values (the buffer of admitted tokens in training too). gamma_h starts at 1.
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        key_dim: int,
        value_dim: int,
        *,
        capacity: int,
        router: str = "surprise",
        router_hidden: int | None = None,
        threshold: ops.ThresholdConfig = ops.ThresholdConfig(),
        logit_scale_init: float | None = None,
        rope_theta: float | None = 10000.0,
        attention: str = "compacted",
        conv_width: int = 4,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
        dtype=None,
        param_dtype=jnp.float32,
        cache_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        validation.check_positive_int("capacity", capacity)
        validation.check_choice("router", router, ROUTERS)
        validation.check_choice("attention", attention, ATTENTION_PATHS)
        validation.check_positive_int("chunk_size", chunk_size)
        logit_scale_init = math.sqrt(key_dim) if logit_scale_init is None else logit_scale_init
        validation.check_positive_float("logit_scale_init", logit_scale_init)
        if rope_theta is not None:
            validation.check_positive_float("rope_theta", rope_theta)
            if key_dim % 2:
                raise ValueError(f"RoPE needs an even key_dim, got {key_dim} (or pass rope_theta=None)")
        self.capacity = capacity
        self.cache_dtype = cache_dtype
        self.router = router
        self.rope_theta = rope_theta
        self.attention = attention
        self.chunk_size = chunk_size
        self.threshold_config = threshold
        self.proj = DeltaProjections(
            d_model, heads, key_dim, value_dim, conv_width=conv_width, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.norm = RMSNorm(value_dim, eps=norm_eps)
        self.attn_norm = RMSNorm(value_dim, eps=norm_eps)
        self.log_logit_scale = NoWeightDecay(jnp.full((heads,), math.log(logit_scale_init), jnp.float32))
        self.gamma = NoWeightDecay(jnp.ones((heads,), jnp.float32))
        if router_hidden is None:
            router_hidden = max(d_model // 4, 1)
        self.router_mlp = (
            LearnedRouter(d_model, heads, router_hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if router == "learned"
            else None
        )
        self.threshold = Threshold(ops.init_threshold(threshold, heads))

    @property
    def tau(self) -> jax.Array:
        """The current threshold exp(log tau): a scalar, or [H] with ThresholdConfig.per_head."""
        return jnp.exp(self.threshold.get_value().log_tau)

    def update_threshold(self, measured_fraction) -> None:
        """One controller step (ops.update_threshold with `threshold_config`), outside the gradient:
        pass stats.over_tau, or stats.over_tau_per_head when the threshold is per head."""
        self.threshold.set_value(
            ops.update_threshold(self.threshold.get_value(), measured_fraction, self.threshold_config)
        )

    def init_cache(self, batch: int, max_len: int, capacity: int | None = None) -> HAMCache:
        """Empty cache for `batch` rows (hamjax.nn.mixer's protocol; max_len bounds nothing here):
        zero RNN state, empty KV cache at position 0, zero conv state. capacity: KV slots per row and
        head (default: the layer's `capacity`, as in training)."""
        check_cache_size(batch, max_len, capacity)
        p = self.proj
        capacity = self.capacity if capacity is None else capacity
        state = ops.init_ham_state(batch, p.heads, p.key_dim, p.value_dim, capacity, self.cache_dtype)
        return HAMCache(state, p.conv.init_state(batch))

    def __call__(
        self,
        x,
        *,
        cache: HAMCache | None = None,
        segment_ids=None,
        valid=None,
        tau=None,
        method: str = "chunk",
        evict: bool = False,
    ):
        """x [B, T, D]; cache from `init_cache` or a previous call (None: empty); segment_ids [B, T]
        (a new segment resets the RNN state, conv state and KV cache); valid [B, T] (False = padding:
        never admitted, RNN, conv and KV cache unchanged, though the position counts it, as in
        ops.ham_sequence; outputs there are to be ignored); tau
        overrides the threshold (scalar or [H]); method "chunk" or "recurrent" for the delta rule;
        evict (one token at a time only): a full cache replaces its least-surprising entry with a
        more surprising token instead of refusing it (ops.ham_step).

        Returns (y [B, T, D], new cache, MixerStats). A length-1 input takes ops.ham_step.
        """
        if evict and x.shape[1] != 1:
            raise ValueError(f"evict applies to one token at a time, got {x.shape[1]} tokens; run them one by one")
        fresh = cache is None
        cache = self.init_cache(*x.shape[:2]) if fresh else cache
        inputs, conv = self.proj(x, cache.conv, segment_ids=segment_ids, valid=valid)
        scores = None if self.router_mlp is None else self.router_mlp(x)
        tau = self.tau if tau is None else tau
        common = dict(
            tau=tau,
            logit_scale=jnp.exp(self.log_logit_scale[...]),
            rope_theta=self.rope_theta,
        )
        if x.shape[1] == 1:
            token = lambda a: None if a is None else a[:, 0]
            out = ops.ham_step(
                *map(token, inputs[:5]),
                cache.ham,
                router_score=token(scores),
                valid=token(valid),
                evict=evict,
                **common,
            )
            with_t = lambda a: a[:, None]
            out = out._replace(
                o_rnn=with_t(out.o_rnn),
                o_attn=with_t(out.o_attn),
                admitted=with_t(out.admitted),
                scores=with_t(out.scores),
            )
        else:
            out = ops.ham_sequence(
                *inputs[:5],
                None if fresh else cache.ham,
                capacity=self.capacity if fresh else None,
                router_scores=scores,
                valid=valid,
                segment_ids=segment_ids,
                attention=self.attention,
                method=method,
                chunk_size=self.chunk_size,
                cache_dtype=self.cache_dtype,
                **common,
            )
        h = self.norm(out.o_rnn) + self.gamma[...][:, None] * self.attn_norm(out.o_attn)
        over_tau, over_tau_per_head = ops.kv_fraction(out.scores > jnp.asarray(tau, jnp.float32), valid)
        stats = MixerStats(
            out.admitted, out.scores, out.kv_fraction, out.kv_fraction_per_head, over_tau, over_tau_per_head
        )
        return self.proj.output(h, inputs.z), HAMCache(out.state, conv), stats
