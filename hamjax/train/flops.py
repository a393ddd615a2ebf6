"""FLOP counts per token (forward; a training step is 3x: the backward costs twice the forward) and
the machine's measured fp32 matmul peak, for model FLOP utilisation (MFU)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from hamjax.nn.model import ModelConfig


def delta_rule_flops(heads: int, key_dim: int, value_dim: int, chunk: int) -> int:
    """Matmul FLOPs per token of the chunked delta rule with errors, per layer. Per chunk of C and
    head: K K^T, W = T(beta K e^g), Q K^T (2C^2 K each); U = T(beta V), (QK^T)Delta, the errors
    (2C^2 V each); the unit-lower inverse (2C^3 / 3); W S0, Q S0, the state update and R
    (2CKV each). Divided by C."""
    c, k, v = chunk, key_dim, value_dim
    return heads * (6 * c * k + 6 * c * v + 2 * c * c // 3 + 8 * k * v)


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per token by component (matmuls only; norms, gates and softmax are left out).
    Attention counts every key it computes: T for full attention, the window for sliding-window
    attention, min(capacity, T) for HAM (as PaLM's MFU, without halving for causality)."""
    c = config
    d, h, k, v = c.d_model, c.heads, c.key_dim, c.value_dim
    counts = {"mlp": 0, "mixer_projections": 0, "delta_rule": 0, "attention": 0, "lm_head": 2 * d * c.vocab_size}
    delta_projections = 2 * d * h * (2 * k + v) + 2 * d * h * (v + 2) + 2 * h * v * d + 2 * c.conv_width * h * (2 * k + v)
    attention_projections = 2 * d * 3 * h * k + 2 * h * k * d + (2 * c.conv_width * 3 * h * k if c.attention_conv else 0)
    for kind in c.mixers:
        counts["mlp"] += 2 * 3 * d * c.mlp_width
        if kind in ("ham", "gdn"):
            counts["mixer_projections"] += delta_projections
            counts["delta_rule"] += delta_rule_flops(h, k, v, min(c.chunk_size, seq_len))
        else:
            counts["mixer_projections"] += attention_projections
        keys = {"ham": min(c.capacity, seq_len), "gdn": 0, "attention": seq_len, "swa": min(c.window, seq_len)}[kind]
        counts["attention"] += 2 * h * keys * (k + (v if kind == "ham" else k))
    return counts


def training_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    return 3 * sum(forward_flops_per_token(config, seq_len).values())


@functools.cache
def measure_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """The best fp32 FLOP/s of a size x size matmul over `repeats` runs (after a warm-up), measured
    once per process and arguments: later calls return the first measurement."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
