"""Sweeps: several runs of one model shape (seeds, learning rates) trained as one compiled program.

Each run's model and optimizer are built as a run of its own would build them (the model from its
seed, the optimizer from its TrainConfig), then their states are stacked along a leading axis of K
runs. A step is jax.vmap of the pure training step over that axis, compiled once for all K, with
one batch shared by every run. Per run, this computes what K separate runs on the same batches
compute, up to float32 rounding of batched against unbatched products (tested).

    sweep = Sweep(model_config, [TrainConfig(learning_rate=lr, seed=s) for lr in lrs for s in seeds])
    metrics = sweep.recall_step(inputs, targets)       # StepMetrics, every leaf with a leading [K]
    model, optimizer = sweep.run(k)                    # run k as nnx objects, e.g. to evaluate
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from hamjax.nn.model import LanguageModel, ModelConfig
from hamjax.train.config import TrainConfig
from hamjax.train.optimizer import TRANSFORMATION_FIELDS, make_optimizer
from hamjax.train.step import StepMetrics, state_recall_step, state_train_step


class Sweep:
    """K runs of one ModelConfig, one per TrainConfig. The configs may differ in learning_rate and
    seed (and in fields the step does not read, such as batch_size); a difference in the optimizer's
    other settings (TRANSFORMATION_FIELDS) is a ValueError naming the field."""

    def __init__(self, model_config: ModelConfig, train_configs: list[TrainConfig]):
        if not train_configs:
            raise ValueError("a sweep needs at least one TrainConfig")
        for name in TRANSFORMATION_FIELDS:
            values = sorted({getattr(tc, name) for tc in train_configs})
            if len(values) > 1:
                raise ValueError(f"the runs of a sweep share one optimizer transformation, but their {name} "
                                 f"differs: {values}")
        states = []
        for tc in train_configs:
            model = LanguageModel(model_config, rngs=nnx.Rngs(tc.seed))
            objects = (model, make_optimizer(model, tc))
            states.append(nnx.state(objects))
        self.graphdef = nnx.graphdef(objects)
        self.state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        self.size = len(train_configs)

    def recall_step(self, inputs, targets) -> StepMetrics:
        """One recall_train_step of every run on the same inputs, targets [B, T] -> StepMetrics [K, ...]."""
        self.state, metrics = _vmapped(state_recall_step, self.graphdef)(self.state, inputs, targets)
        return metrics

    def train_step(self, rows, segment_ids) -> StepMetrics:
        """One train_step of every run on the same rows, segment_ids [A, B, T + 1] -> StepMetrics [K, ...]."""
        self.state, metrics = _vmapped(state_train_step, self.graphdef)(self.state, rows, segment_ids)
        return metrics

    def run(self, k: int) -> tuple[LanguageModel, nnx.Optimizer]:
        """Run k's model and optimizer as they stand (copies: training them does not move the sweep)."""
        if not 0 <= k < self.size:
            raise ValueError(f"run {k} is not in this sweep of {self.size} runs")
        return nnx.merge(self.graphdef, jax.tree.map(lambda x: x[k], self.state))


@functools.lru_cache(maxsize=16)
def _vmapped(pure_step, graphdef):
    """pure_step(graphdef) (step.state_train_step or state_recall_step) vmapped over the runs'
    states, the batch shared, and jitted."""
    return jax.jit(jax.vmap(pure_step(graphdef), in_axes=(0, None, None)), donate_argnums=0)
