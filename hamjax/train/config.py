"""Run configuration: frozen dataclasses for the model, data and training, and named presets.

The CLI is generated from these dataclasses (hamjax.cli.flags): every field is a flag.
"""

from __future__ import annotations

import dataclasses

from hamjax.nn.model import ModelConfig
from hamjax.ops import validation


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """source: "kjv" (the embedded default corpus), a local .txt/.json/.jsonl file or folder, or a
    Hugging Face hub dataset name; text_field: the column holding the text in JSON or hub data;
    tokenizer: "bytes" or a Hugging Face tokenizer name or path; seq_len: tokens per packed row;
    validation_fraction: share of documents held out; cache_dir: where the corpus is prepared
    (hamjax.data.prepared; "": $HAMJAX_CACHE/prepared or ~/.cache/hamjax/prepared); streaming:
    stream the documents instead of preparing them (hamjax.data.streaming: read in the source's
    order, each process its own part; the validation rows are the first eval_batches x batch_size
    of the held-out documents)."""

    source: str = "kjv"
    text_field: str = "text"
    tokenizer: str = "bytes"
    seq_len: int = 256
    validation_fraction: float = 0.02
    cache_dir: str = ""
    streaming: bool = False

    def __post_init__(self):
        validation.check_positive_int("seq_len", self.seq_len)
        if not 0.0 < self.validation_fraction <= 0.5:
            raise ValueError(f"validation_fraction must be in (0, 0.5], got {self.validation_fraction!r}")


METRIC_WRITERS = ("jsonl", "tensorboard", "wandb")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """AdamW with warmup + cosine decay to min_lr_ratio * learning_rate, global-norm clipping and no
    weight decay on norms, biases, A_log and dt_bias. One step consumes grad_accum * batch_size rows.
    Evaluates every eval_every steps on eval_batches validation batches (0: all), saves a checkpoint
    every save_every steps and keeps the last keep_checkpoints. mesh_data x mesh_fsdp x mesh_tensor:
    the device mesh (hamjax.train.sharding; mesh_data 0 takes the devices the others leave).

    Bookkeeping: the step metrics are read back from the device every log_every steps (and at every
    evaluation, save and stop); prefetch batches are built ahead in a background thread (0: in the
    loop); metrics names the writers, comma-separated, from METRIC_WRITERS (jsonl always: the plot and
    resuming read it); profile_steps "START:END" traces steps START to END with the JAX profiler
    into the run folder's profile/ ("": none)."""

    steps: int = 400
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip_norm: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 0
    save_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    mesh_data: int = 0
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    log_every: int = 10
    prefetch: int = 2
    metrics: str = "jsonl"
    profile_steps: str = ""

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "keep_checkpoints",
                     "mesh_fsdp", "mesh_tensor", "log_every"):
            validation.check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "seed", "eval_batches", "mesh_data", "prefetch"):
            validation.check_nonnegative_int(name, getattr(self, name))
        for name in ("learning_rate", "clip_norm"):
            validation.check_positive_float(name, getattr(self, name))
        for name in ("min_lr_ratio", "weight_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        unknown = set(self.metric_writers) - set(METRIC_WRITERS)
        if unknown or "jsonl" not in self.metric_writers:
            raise ValueError(
                f"metrics must list writers from {METRIC_WRITERS}, jsonl among them (the plot and resuming "
                f"read it), got {self.metrics!r}"
            )
        self.profile_range  # raises on a malformed range

    @property
    def metric_writers(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.metrics.split(",") if name.strip())

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """profile_steps as (first, last) step, both traced; None when empty."""
        if not self.profile_steps:
            return None
        first, _, last = self.profile_steps.partition(":")
        try:
            first, last = int(first), int(last)
        except ValueError:
            first = last = 0
        if not 1 <= first <= last:
            raise ValueError(f"profile_steps must be START:END with 1 <= START <= END, got {self.profile_steps!r}")
        return first, last


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: model, data, training, and the run folder (config.json, metrics.jsonl,
    checkpoints/, plot.png)."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    run_dir: str = "runs/small"

    def __post_init__(self):
        if self.data.streaming and not self.train.eval_batches:
            raise ValueError("streaming needs eval_batches > 0: a stream's validation split has no end to evaluate "
                             "up to; pass --eval_batches N")


PRESETS: dict[str, RunConfig] = {
    # Seconds on a CPU: the tests' model.
    "tiny": RunConfig(
        ModelConfig(d_model=32, n_layers=2, heads=2, key_dim=16, value_dim=16, capacity=64, window=16, chunk_size=16),
        DataConfig(seq_len=64),
        TrainConfig(steps=20, batch_size=4, warmup_steps=2, eval_every=10, eval_batches=2, save_every=10),
        run_dir="runs/tiny",
    ),
    # The CPU default: about 10 minutes on 2 cores.
    "small": RunConfig(),
    # The paper's setting (~800M parameters, 4k context, 50B tokens); for accelerators.
    "paper": RunConfig(
        ModelConfig(
            vocab_size=50304, d_model=1536, n_layers=24, heads=12, key_dim=128, value_dim=128, mlp_hidden=4096,
            capacity=4096, window=1024, tau_freeze_steps=20_000, remat=True,
        ),
        DataConfig(source="HuggingFaceFW/fineweb-edu", tokenizer="EleutherAI/gpt-neox-20b", seq_len=4096, streaming=True),
        TrainConfig(
            steps=48_000, batch_size=256, learning_rate=1e-3, warmup_steps=2_000, eval_every=1_000, eval_batches=50,
            save_every=1_000,
        ),
        run_dir="runs/paper",
    ),
}


def preset(name: str) -> RunConfig:
    """The named preset; ValueError listing the presets for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(values: dict) -> RunConfig:
    """Inverse of config_to_dict (a run folder's config.json); unknown or invalid fields raise."""
    sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
    kwargs = {name: cls(**values[name]) for name, cls in sections.items() if name in values}
    return RunConfig(**kwargs, **{k: v for k, v in values.items() if k not in sections})


# Fields that may differ when a run resumes: they change when and where things happen, not what is
# computed (a run saved on one mesh resumes on another).
BOOKKEEPING_FIELDS = {
    "eval_every", "eval_batches", "save_every", "keep_checkpoints", "async_checkpoints", "mesh_data", "mesh_fsdp",
    "mesh_tensor", "log_every", "prefetch", "metrics", "profile_steps", "cache_dir",
}


def resume_conflicts(saved: RunConfig, current: RunConfig) -> list[str]:
    """The fields (section.name) whose values differ between a run folder's config and this one,
    ignoring BOOKKEEPING_FIELDS."""
    old, new = config_to_dict(saved), config_to_dict(current)
    conflicts = []
    for section in ("model", "data", "train"):
        for name, value in new[section].items():
            if name not in BOOKKEEPING_FIELDS and old[section].get(name) != value:
                conflicts.append(f"{section}.{name}: {old[section].get(name)!r} -> {value!r}")
    return conflicts
