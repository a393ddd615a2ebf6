"""Where a run's metrics go: metrics.jsonl always (the plot and resuming read it), TensorBoard
event files (tensorboardX) and a Weights & Biases run on request (`--metrics jsonl,tensorboard,wandb`).
Only the process that writes the run folder writes metrics."""

from __future__ import annotations

import json
import os
import pathlib

from hamjax.train.config import RunConfig, config_to_dict
from hamjax.train.run_folder import MetricsLog


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record -> its numbers named "<kind>/<field>"; a per-layer list becomes
    "<kind>/<field>/layer_<i>", a per-layer, per-head one "<kind>/<field>/layer_<i>/head_<j>"."""
    named = {}

    def add(name, value):
        if isinstance(value, list):
            for i, item in enumerate(value):
                add(f"{name}/{'layer' if name.count('/') == 1 else 'head'}_{i}", item)
        else:
            named[name] = float(value)

    for field, value in record.items():
        if field not in ("kind", "step"):
            add(f"{record['kind']}/{field}", value)
    return named


def flat_config(config: RunConfig) -> dict[str, object]:
    """The run's config as {"<section>.<field>": value} (W&B's and TensorBoard's hyperparameters)."""
    flat = {}
    for section, values in config_to_dict(config).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{name}": value for name, value in values.items()})
        else:
            flat[section] = values
    return flat


class MetricWriters:
    """metrics.jsonl (see run_folder.MetricsLog) and the writers config.train.metrics names, in the
    run folder: tensorboard/ (event files; a resumed run purges the steps after its checkpoint) and
    wandb/ (offline unless WANDB_MODE says otherwise). The hyperparameters are written at the start.
    With write=False (the other processes of a multi-process run) nothing is written."""

    def __init__(self, run: pathlib.Path, config: RunConfig, resume_step: int = 0, *, write: bool = True):
        self.jsonl = MetricsLog(run / "metrics.jsonl", resume_step, write=write)
        names = config.train.metric_writers if write else ()
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step + 1)
            self.tensorboard.add_text("hyperparameters", "```\n" + json.dumps(flat_config(config), indent=1) + "\n```",
                                      global_step=resume_step)
        if "wandb" in names:
            self.wandb = _start_wandb(run, config)

    def write(self, record: dict) -> None:
        """One metrics record: {"kind": "train" or "eval", "step": int, field: number or list}."""
        self.jsonl.write(record)
        named = scalars(record) if self.tensorboard is not None or self.wandb is not None else {}
        if self.tensorboard is not None:
            for name, value in named.items():
                self.tensorboard.add_scalar(name, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(named, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run: pathlib.Path, config: RunConfig):
    try:
        import wandb
    except ImportError as error:
        raise ValueError("--metrics wandb needs the wandb package: pip install 'hamjax[wandb]'") from error
    run.joinpath("wandb").mkdir(exist_ok=True)
    return wandb.init(
        project="hamjax", name=run.name, dir=str(run), config=flat_config(config),
        mode=os.environ.get("WANDB_MODE", "offline"),
    )
