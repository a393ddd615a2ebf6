"""The jitted training and evaluation steps: next-token cross-entropy on packed rows, gradient
accumulation over micro-batches, one optimizer update and one threshold-controller step."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hamjax.data import target_mask
from hamjax.nn.model import LanguageModel


class StepMetrics(NamedTuple):
    """loss: mean next-token loss in nats; tokens: scored targets; grad_norm: before clipping;
    kv_fraction [L_ham]: admitted / tokens per HAM layer; tau [L_ham]: thresholds after the step."""

    loss: jax.Array
    tokens: jax.Array
    grad_norm: jax.Array
    kv_fraction: jax.Array
    tau: jax.Array


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Next-token loss in nats per token -> bits per byte of text."""
    return loss_nats / math.log(2.0) / bytes_per_token


def _loss_sum(model: LanguageModel, rows, segment_ids):
    """rows, segment_ids [B, T + 1] -> (summed loss over scored targets, ModelStats)."""
    logits, stats = model(rows[:, :-1], segment_ids=segment_ids[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:])
    return jnp.sum(jnp.where(target_mask(segment_ids), losses, 0.0)), stats


@nnx.jit
def train_step(model: LanguageModel, optimizer: nnx.Optimizer, rows, segment_ids) -> StepMetrics:
    """rows, segment_ids [A, B, T + 1] (A micro-batches): the mean loss over all scored targets,
    its gradient accumulated over the micro-batches, one AdamW update, then one controller step
    per HAM layer with the KV fraction measured over the whole batch."""
    tokens = jnp.sum(target_mask(segment_ids.reshape(-1, segment_ids.shape[-1])))
    scale = 1.0 / jnp.maximum(tokens, 1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def micro_step(grads, batch):
        def loss(params):
            loss_sum, stats = _loss_sum(nnx.merge(graphdef, params, rest), *batch)
            return loss_sum * scale, stats

        (loss_value, stats), micro_grads = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree.map(jnp.add, grads, micro_grads), (loss_value, stats.kv_fraction)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, fractions) = jax.lax.scan(micro_step, zeros, (rows, segment_ids))
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    kv_fraction = jnp.mean(fractions, axis=0)
    model.update_thresholds(kv_fraction)
    return StepMetrics(jnp.sum(losses), tokens, grad_norm, kv_fraction, model.taus())


@nnx.jit
def eval_step(model: LanguageModel, rows, segment_ids):
    """rows, segment_ids [B, T + 1] -> (summed loss, scored targets, kv_fraction [L_ham])."""
    loss_sum, stats = _loss_sum(model, rows, segment_ids)
    return loss_sum, jnp.sum(target_mask(segment_ids)), stats.kv_fraction
