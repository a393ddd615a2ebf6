"""AdamW with warmup + cosine decay, global-norm clipping, and weight decay only where it belongs."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hamjax.nn.variables import NoWeightDecay
from hamjax.train.config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate over warmup_steps, then cosine decay to
    min_lr_ratio * learning_rate at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        0.0,
        config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def weight_decay_mask(model: nnx.Module) -> nnx.State:
    """True for the parameters that get weight decay: matrices (and embeddings) that are not
    NoWeightDecay. Norm scales, biases, A_log, dt_bias and the HAM attention scales get none."""
    params = nnx.state(model, nnx.Param)
    decays = lambda v: not isinstance(v, NoWeightDecay) and v.ndim >= 2
    return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


# The TrainConfig fields the transformation depends on; the learning rate goes into its state.
TRANSFORMATION_FIELDS = ("steps", "warmup_steps", "min_lr_ratio", "weight_decay", "beta1", "beta2", "clip_norm")


def make_optimizer(model: nnx.Module, config: TrainConfig) -> nnx.Optimizer:
    """nnx.Optimizer over the model's nnx.Params (the threshold is not one: its controller moves it).

    AdamW as optax.adamw computes it, with the peak learning rate held in the optimizer state
    (optax.inject_hyperparams) rather than in the transformation. Configs that differ only outside
    the optimizer's settings (learning rate, seed, batch size, ...) share one transformation object,
    so a rebuilt optimizer (a resumed run, a sweep over learning rates or seeds) reuses the jitted
    train step instead of compiling it again.
    """
    leaves, treedef = jax.tree.flatten(weight_decay_mask(model))
    settings = {name: getattr(config, name) for name in TRANSFORMATION_FIELDS}
    optimizer = nnx.Optimizer(model, _transformation(TrainConfig(**settings), treedef, tuple(leaves)), wrt=nnx.Param)
    # Found by name (optax.tree_utils), not by its place in the chain's state.
    optax.tree_utils.tree_get(optimizer.opt_state, "peak")[...] = jnp.asarray(config.learning_rate, jnp.float32)
    return optimizer


@functools.lru_cache(maxsize=16)
def _transformation(config: TrainConfig, mask_treedef, mask_leaves: tuple[bool, ...]) -> optax.GradientTransformation:
    """optax.adamw's chain (Adam, masked decoupled weight decay, the scheduled step) after clipping.
    The step is peak x the schedule of peak 1; peak is a hyperparameter in the state, set by make_optimizer."""
    unit = learning_rate_schedule(dataclasses.replace(config, learning_rate=1.0))
    scheduled_step = lambda peak: optax.scale_by_learning_rate(lambda count: peak * unit(count))
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.scale_by_adam(b1=config.beta1, b2=config.beta2),
        optax.add_decayed_weights(config.weight_decay, mask=jax.tree.unflatten(mask_treedef, mask_leaves)),
        optax.inject_hyperparams(scheduled_step)(peak=1.0),
    )
