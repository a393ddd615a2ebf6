"""The jitted training and evaluation steps: next-token cross-entropy on packed rows, gradient
accumulation over micro-batches, one optimizer update and one threshold-controller step."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hamjax.data import IGNORE_INDEX, recall_accuracy, target_mask
from hamjax.nn.model import LanguageModel
from hamjax.train import sharding


class StepMetrics(NamedTuple):
    """loss: mean next-token loss in nats; tokens: scored targets; grad_norm: before clipping;
    kv_fraction [L_ham]: admitted / tokens per HAM layer; tau [L_ham] (or [L_ham, H] with
    tau_per_head): thresholds after the step."""

    loss: jax.Array
    tokens: jax.Array
    grad_norm: jax.Array
    kv_fraction: jax.Array
    tau: jax.Array


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Next-token loss in nats per token -> bits per byte of text."""
    return loss_nats / math.log(2.0) / bytes_per_token


def summed_loss(model: LanguageModel, rows, segment_ids, valid=None):
    """rows, segment_ids [B, T + 1]; valid [B, T] bool (False = padding; None: all valid) -> (summed
    loss over the valid scored targets, ModelStats)."""
    losses, stats = _target_losses(model, rows, segment_ids, valid)
    return jnp.sum(losses), stats


def _target_losses(model: LanguageModel, rows, segment_ids, valid):
    """As summed_loss, the loss of each target [B, T] instead of their sum (0 where unscored)."""
    logits, stats = model(rows[:, :-1], segment_ids=segment_ids[:, :-1], valid=valid)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:])
    return jnp.where(_scored(segment_ids, valid), losses, 0.0), stats


def _scored(segment_ids, valid):
    """segment_ids [B, T + 1], valid [B, T] bool or None -> [B, T] bool: the targets that count."""
    scored = target_mask(segment_ids)
    return scored if valid is None else scored & valid


def _train_update(model: LanguageModel, optimizer: nnx.Optimizer, rows, segment_ids) -> StepMetrics:
    """The body of train_step. rows, segment_ids [A, B, T + 1] (A micro-batches): the mean loss over all scored targets,
    its gradient accumulated over the micro-batches, one AdamW update, then one controller step
    per HAM layer with the fraction of tokens over tau measured over the whole batch."""
    tokens = jnp.sum(target_mask(segment_ids.reshape(-1, segment_ids.shape[-1])))
    scale = 1.0 / jnp.maximum(tokens, 1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def micro_step(grads, batch):
        def loss(params):
            loss_sum, stats = summed_loss(nnx.merge(graphdef, params, rest), *batch)
            return loss_sum * scale, stats

        (loss_value, stats), micro_grads = jax.value_and_grad(loss, has_aux=True)(params)
        measured = (loss_value, stats.kv_fraction, model.controller_signal(stats))
        return jax.tree.map(jnp.add, grads, micro_grads), measured

    zeros = jax.tree.map(jnp.zeros_like, params)
    if rows.shape[0] == 1:  # one micro-batch: no loop to carry (and copy) the gradients through
        grads, measured = micro_step(zeros, (rows[0], segment_ids[0]))
        losses, fractions, over_tau = (x[None] for x in measured)
    else:
        grads, (losses, fractions, over_tau) = jax.lax.scan(micro_step, zeros, (rows, segment_ids))
    mean = lambda x: jnp.mean(x, axis=0)
    return _apply_update(model, optimizer, grads, jnp.sum(losses), tokens, mean(fractions), mean(over_tau))


def _apply_update(
    model: LanguageModel, optimizer: nnx.Optimizer, grads, loss, tokens, kv_fraction, over_tau
) -> StepMetrics:
    """The tail every training step shares: one optimizer update with the gradient of the mean loss,
    then one controller step per HAM layer from over_tau (LanguageModel.controller_signal) measured
    over the whole batch."""
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    model.update_thresholds(over_tau)
    return StepMetrics(loss, tokens, grad_norm, kv_fraction, model.taus())


class EvalSums(NamedTuple):
    """Of one evaluation batch: loss (summed over the scored targets), tokens (scored targets),
    kv_fraction [L_ham] (over the valid rows); hit_loss and hit_tokens: the same two over the
    targets marked as recall hits (0 when none are marked)."""

    loss: jax.Array
    tokens: jax.Array
    kv_fraction: jax.Array
    hit_loss: jax.Array
    hit_tokens: jax.Array


def _eval_sums(model: LanguageModel, rows, segment_ids, valid_rows=None, hits=None) -> EvalSums:
    """rows, segment_ids [B, T + 1]; valid_rows [B, 1] bool (False: a padding row that counts for
    nothing; None: every row counts); hits [B, T] bool (data.recall_hits; None: none) -> EvalSums."""
    valid = None if valid_rows is None else jnp.broadcast_to(valid_rows, (rows.shape[0], rows.shape[1] - 1))
    losses, stats = _target_losses(model, rows, segment_ids, valid)
    scored = _scored(segment_ids, valid)
    hits = jnp.zeros_like(scored) if hits is None else scored & hits
    return EvalSums(
        jnp.sum(losses), jnp.sum(scored), stats.kv_fraction, jnp.sum(jnp.where(hits, losses, 0.0)), jnp.sum(hits)
    )


train_step = nnx.jit(_train_update)


class MeshSteps:
    """The training step and the evaluation sums for a model and optimizer laid out on a mesh. The
    constructor places their state by hamjax.train.sharding's rules; batches come in as global arrays
    (sharding.global_rows); each step's updated state keeps that layout (the old state is donated)
    and the model and optimizer objects are updated in place, as by train_step."""

    def __init__(self, model: LanguageModel, optimizer: nnx.Optimizer, mesh: Mesh):
        self.objects, self.mesh = (model, optimizer), mesh
        graphdef, state = nnx.split(self.objects)
        shardings = sharding.state_shardings(state, mesh)
        nnx.update(self.objects, sharding.place(state, shardings))
        leaves, treedef = jax.tree.flatten(shardings)
        replicated = NamedSharding(mesh, P())
        self._train = _compiled_train(graphdef, treedef, tuple(leaves), sharding.batch_sharding(mesh, 3), replicated)
        self._eval = _compiled_eval(graphdef, treedef, tuple(leaves), replicated)

    def train(self, rows, segment_ids) -> StepMetrics:
        """rows, segment_ids [A, B, T + 1] global arrays -> StepMetrics (see train_step)."""
        state, metrics = self._train(nnx.state(self.objects), rows, segment_ids)
        nnx.update(self.objects, state)
        return metrics

    def evaluate(self, rows, segment_ids, valid_rows=None, hits=None) -> EvalSums:
        """rows, segment_ids [B, T + 1], valid_rows [B, 1] and hits [B, T] (either may be None) global
        arrays -> EvalSums."""
        return self._eval(nnx.state(self.objects), rows, segment_ids, valid_rows, hits)


def pure_step(update, graphdef):
    """update(model, optimizer, *batch) -> StepMetrics (the body of train_step or recall_train_step)
    as a pure function of the (model, optimizer) state of `graphdef`: (state, *batch) -> (updated
    state, StepMetrics), for jax.jit, jax.vmap and lowering."""

    def step(state, *batch):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = update(model, optimizer, *batch)
        return nnx.state((model, optimizer)), metrics

    return step


def state_train_step(graphdef):
    """train_step as a pure function: (state, rows, segment_ids) -> (updated state, StepMetrics)."""
    return pure_step(_train_update, graphdef)


@functools.lru_cache(maxsize=8)
def _compiled_train(graphdef, treedef, leaves, batch: NamedSharding, replicated: NamedSharding):
    shardings = jax.tree.unflatten(treedef, leaves)
    return jax.jit(
        state_train_step(graphdef), in_shardings=(shardings, batch, batch), out_shardings=(shardings, replicated),
        donate_argnums=0,
    )


@functools.lru_cache(maxsize=8)
def _compiled_eval(graphdef, treedef, leaves, replicated: NamedSharding):
    def evaluate(state, rows, segment_ids, valid_rows, hits):
        model, _ = nnx.merge(graphdef, state)
        return _eval_sums(model, rows, segment_ids, valid_rows, hits)

    shardings = jax.tree.unflatten(treedef, leaves)
    return jax.jit(evaluate, in_shardings=(shardings, None, None, None, None), out_shardings=replicated)


# Recall tasks (MQAR, pass key): inputs [B, T] with aligned targets [B, T], IGNORE_INDEX where unscored.


def _recall_loss_sum(model: LanguageModel, inputs, targets):
    """inputs, targets [B, T] -> (summed cross-entropy over the scored targets, logits [B, T, vocab],
    ModelStats). Every row is one document: no segment ids, which the model treats as segment ids
    all equal (no state reset) without the segment masks, which XLA would constant-fold slowly."""
    logits, stats = model(inputs)
    scored = targets != IGNORE_INDEX
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(scored, targets, 0))
    return jnp.sum(jnp.where(scored, losses, 0.0)), (logits, stats)


def _recall_update(model: LanguageModel, optimizer: nnx.Optimizer, inputs, targets) -> StepMetrics:
    """The body of recall_train_step. inputs [B, T] int32 and targets [B, T] int32 (the token to
    predict after inputs[t], IGNORE_INDEX where unscored): the mean cross-entropy over the scored
    targets, one optimizer update, then one controller step per HAM layer from the batch's fraction
    of tokens over tau, as train_step. StepMetrics.tokens counts the scored targets."""
    scored = jnp.sum(targets != IGNORE_INDEX)
    scale = 1.0 / jnp.maximum(scored, 1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        loss_sum, (_, stats) = _recall_loss_sum(nnx.merge(graphdef, params, rest), inputs, targets)
        return loss_sum * scale, stats

    (loss_value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return _apply_update(
        model, optimizer, grads, loss_value, scored, stats.kv_fraction, model.controller_signal(stats)
    )


recall_train_step = nnx.jit(_recall_update)


def state_recall_step(graphdef):
    """recall_train_step as a pure function: (state, inputs, targets) -> (updated state, StepMetrics)."""
    return pure_step(_recall_update, graphdef)


@nnx.jit
def _recall_predict(model: LanguageModel, inputs, targets):
    loss_sum, (logits, stats) = _recall_loss_sum(model, inputs, targets)
    return jnp.argmax(logits, axis=-1), loss_sum, stats.kv_fraction


class RecallEvaluation(NamedTuple):
    """accuracy: argmax accuracy over the scored targets (hamjax.data.recall_accuracy); loss: mean
    cross-entropy over them in nats; kv_fraction [L_ham]: admitted / tokens per HAM layer."""

    accuracy: float
    loss: float
    kv_fraction: np.ndarray


def recall_evaluate(model: LanguageModel, inputs, targets) -> RecallEvaluation:
    """inputs, targets [B, T] as for recall_train_step -> RecallEvaluation of the model as it is (the
    thresholds are not moved)."""
    predictions, loss_sum, kv_fraction = _recall_predict(model, jnp.asarray(inputs), jnp.asarray(targets))
    scored = int(np.sum(np.asarray(targets) != IGNORE_INDEX))
    return RecallEvaluation(
        recall_accuracy(predictions, targets), float(loss_sum) / max(scored, 1), np.asarray(kv_fraction)
    )
