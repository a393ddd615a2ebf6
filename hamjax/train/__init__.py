"""Training: configs and presets, the Optax optimizer, the jitted steps, Orbax checkpoints, metrics,
the loop, and sweeps of several runs in one program."""

from hamjax.train.checkpoint import Checkpoints
from hamjax.train.config import PRESETS, DataConfig, RunConfig, TrainConfig, preset
from hamjax.train.loop import Evaluation, RunSummary, evaluate, evaluate_checkpoint, load_model, train
from hamjax.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask
from hamjax.train.step import (
    RecallEvaluation,
    StepMetrics,
    bits_per_byte,
    recall_evaluate,
    recall_train_step,
    train_step,
)
from hamjax.train.step_log import NonFiniteLoss
from hamjax.train.sweep import Sweep

__all__ = [
    "PRESETS",
    "Checkpoints",
    "DataConfig",
    "Evaluation",
    "NonFiniteLoss",
    "RecallEvaluation",
    "RunConfig",
    "RunSummary",
    "StepMetrics",
    "Sweep",
    "TrainConfig",
    "bits_per_byte",
    "evaluate",
    "evaluate_checkpoint",
    "learning_rate_schedule",
    "load_model",
    "make_optimizer",
    "preset",
    "recall_evaluate",
    "recall_train_step",
    "train",
    "train_step",
    "weight_decay_mask",
]
