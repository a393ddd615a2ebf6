"""The training loop and evaluation: data -> model -> loss -> optimizer, with checkpoints, metrics,
a progress bar, Ctrl-C handling and a stop on a non-finite loss."""

from __future__ import annotations

import json
import math
import pathlib
import signal
import statistics
import threading
import time
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from hamjax.data import (
    Corpus, PackedRows, batch_indices, load_tokenizer, prepare_corpus, recall_hits, sequential_indices,
)
from hamjax.nn.model import LanguageModel
from hamjax.train.checkpoint import Checkpoints
from hamjax.train.config import RunConfig
from hamjax.train.flops import measure_matmul_peak, training_flops_per_token
from hamjax.train.optimizer import make_optimizer
from hamjax.train.plot import plot_run
from hamjax.train.run_folder import MetricsLog, load_run_config, prepare_run_folder
from hamjax.train.sharding import batch_on_mesh, check_batch_size, global_rows, make_mesh
from hamjax.train.step import MeshSteps, bits_per_byte


class NonFiniteLoss(RuntimeError):
    """Training stopped because the loss became NaN or infinite."""


class Evaluation(NamedTuple):
    """Mean loss (nats per token) and bits per byte over the scored targets, KV fraction per HAM
    layer, scored targets; with recall_ngram, the same split into recall hits (hit_*) and the rest
    (other_*); None without."""

    loss: float
    bpb: float
    kv_fraction: list[float]
    tokens: int
    hit_bpb: float | None = None
    hit_tokens: int | None = None
    other_bpb: float | None = None
    other_tokens: int | None = None


class RunSummary(NamedTuple):
    """status: "finished" or "interrupted"; step: the last step trained; validation: the final
    evaluation (None when interrupted); tokens_per_s and mfu: medians over the steps of this process
    after the first (which compiles)."""

    status: str
    step: int
    validation: Evaluation | None
    tokens_per_s: float
    mfu: float
    seconds: float


def load_corpus(config: RunConfig) -> Corpus:
    """The run's tokenized, packed corpus; ValueError if the tokenizer's vocabulary does not fit."""
    tokenizer = load_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"tokenizer {config.data.tokenizer!r} has {tokenizer.vocab_size} ids but vocab_size is "
            f"{config.model.vocab_size}; pass --vocab_size {tokenizer.vocab_size} or more"
        )
    return prepare_corpus(
        config.data.source,
        tokenizer,
        seq_len=config.data.seq_len,
        validation_fraction=config.data.validation_fraction,
        text_field=config.data.text_field,
    )


def build(config: RunConfig) -> tuple[LanguageModel, nnx.Optimizer]:
    model = LanguageModel(config.model, rngs=nnx.Rngs(config.train.seed))
    return model, make_optimizer(model, config.train)


def evaluate(
    steps: MeshSteps, rows: PackedRows, bytes_per_token: float, batch_size: int, max_batches: int = 0,
    recall_ngram: int | None = None,
):
    """Mean next-token loss, bits per byte and KV fraction per HAM layer over the rows (in order, in
    batches of batch_size; the first max_batches batches, 0: all) of the model in `steps`. The
    thresholds do not move. A short last batch is padded with rows that count for nothing, so that
    the evaluation step compiles for one shape. recall_ngram n: also split the targets into recall
    hits (`data.recall_hits` with that n) and the rest."""
    hits = None if recall_ngram is None else recall_hits(rows.tokens, rows.segment_ids, recall_ngram)
    sums, fractions = [], []
    for i, index in enumerate(sequential_indices(len(rows.tokens), batch_size)):
        if max_batches and i == max_batches:
            break
        batch = _padded_batch(rows, index, batch_size, steps.mesh)
        batch_hits = None if hits is None else global_rows(hits, _padded_index(index, batch_size), batch[0].sharding)
        result = steps.evaluate(*batch, batch_hits)
        sums.append([float(result.loss), int(result.tokens), float(result.hit_loss), int(result.hit_tokens)])
        fractions.append((np.asarray(result.kv_fraction), len(index)))
    loss_sum, tokens, hit_loss, hit_tokens = (sum(column) for column in zip(*sums))
    bpb = lambda total, count: bits_per_byte(total / max(count, 1), bytes_per_token)
    kv = sum(f * n for f, n in fractions) / sum(n for _, n in fractions)
    split = {} if hits is None else dict(
        hit_bpb=bpb(hit_loss, hit_tokens), hit_tokens=hit_tokens,
        other_bpb=bpb(loss_sum - hit_loss, tokens - hit_tokens), other_tokens=tokens - hit_tokens,
    )
    loss = loss_sum / max(tokens, 1)
    return Evaluation(loss, bits_per_byte(loss, bytes_per_token), [float(f) for f in kv], tokens, **split)


def _padded_batch(rows: PackedRows, index: np.ndarray, batch_size: int, mesh):
    """The rows at `index` [n <= batch_size], padded with copies of the last one -> global arrays
    tokens, segment_ids [batch_size, L] and valid_rows [batch_size, 1] bool (False: padding)."""
    padded = _padded_index(index, batch_size)
    tokens, segment_ids = batch_on_mesh(*rows, padded, mesh)
    valid = (np.arange(batch_size) < len(index))[:, None]
    return tokens, segment_ids, global_rows(valid, np.arange(batch_size), tokens.sharding)


def _padded_index(index: np.ndarray, batch_size: int) -> np.ndarray:
    """Row numbers [n <= batch_size] -> [batch_size], repeating the last one."""
    return np.pad(index, (0, batch_size - len(index)), mode="edge")


class _StopRequest:
    """The first Ctrl-C asks the loop to save and stop after the current step; a second one
    interrupts at once. (Only the main thread can catch signals; elsewhere Ctrl-C is left alone.)"""

    def __init__(self):
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press again to abort at once)")

    def close(self):
        if self.previous is not None and not self.requested:
            signal.signal(signal.SIGINT, self.previous)


def train(config: RunConfig, *, progress: bool = True) -> RunSummary:
    """Train (or resume) the run in config.run_dir; see the README's training section."""
    started = time.perf_counter()
    tc = config.train
    mesh = make_mesh(tc.mesh_data, tc.mesh_fsdp, tc.mesh_tensor)
    check_batch_size(tc.batch_size, mesh)
    corpus = load_corpus(config)
    model, optimizer = build(config)
    steps = MeshSteps(model, optimizer, mesh)
    primary = jax.process_index() == 0  # the process that writes the run folder's files
    run = prepare_run_folder(config, write=primary)
    checkpoints = Checkpoints(run / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpoints)
    start = 0
    if checkpoints.latest_step() is not None:
        start = checkpoints.restore(model, optimizer)["step"]
    log = MetricsLog(run / "metrics.jsonl", resume_step=start, write=primary)
    peak = measure_matmul_peak()
    rows_per_step = tc.batch_size * tc.grad_accum
    flops_per_token = training_flops_per_token(config.model, config.data.seq_len)
    record = lambda step: {"step": step, "data_position": step * rows_per_step, "seed": tc.seed}
    speeds, mfus, status, step, validation = [], [], "finished", start, None
    stop = _StopRequest()
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and primary), unit="step", dynamic_ncols=True)
    try:
        for step in range(start + 1, tc.steps + 1):
            index = batch_indices(len(corpus.train.tokens), step - 1, rows_per_step, tc.seed)
            batch = batch_on_mesh(*corpus.train, index.reshape(tc.grad_accum, tc.batch_size), mesh)
            tick = time.perf_counter()
            metrics = steps.train(*batch)
            loss, grad_norm = float(metrics.loss), float(metrics.grad_norm)
            seconds = time.perf_counter() - tick
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                last = checkpoints.latest_step()
                where = (f"stopped; the last good checkpoint is step {last} in {checkpoints.directory}"
                         if last is not None else "stopped before any checkpoint was saved")
                raise NonFiniteLoss(
                    f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}: training {where}"
                )
            tokens_per_s = int(metrics.tokens) / seconds
            mfu = tokens_per_s * flops_per_token / peak
            if step > start + 1:
                speeds.append(tokens_per_s)
                mfus.append(mfu)
            kv = [float(f) for f in np.asarray(metrics.kv_fraction)]
            log.write({
                "kind": "train", "step": step, "loss": loss, "bpb": bits_per_byte(loss, corpus.bytes_per_token),
                "grad_norm": grad_norm, "kv_fraction": kv,
                "tau": [float(t) for t in np.asarray(metrics.tau)], "tokens_per_s": tokens_per_s, "mfu": mfu,
            })
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", kv=" ".join(f"{f:.2f}" for f in kv))
            if step % tc.eval_every == 0 or step == tc.steps:
                validation = evaluate(steps, corpus.validation, corpus.bytes_per_token, tc.batch_size, tc.eval_batches)
                log.write({"kind": "eval", "step": step, "loss": validation.loss, "bpb": validation.bpb,
                           "kv_fraction": validation.kv_fraction})
            if step % tc.save_every == 0 or step == tc.steps or stop.requested:
                checkpoints.save(step, model, optimizer, record(step))
            if stop.requested:
                status = "interrupted"
                break
    finally:
        bar.close()
        stop.close()
        checkpoints.wait()
        checkpoints.close()
    if primary:
        plot_run(run, config.model.kv_target)
    if status == "interrupted":
        validation = None
    elif validation is None or tc.eval_batches:  # the final step's evaluation was partial or did not run here
        validation = evaluate(steps, corpus.validation, corpus.bytes_per_token, tc.batch_size)
    median = lambda xs: statistics.median(xs) if xs else float("nan")
    summary = RunSummary(status, step, validation, median(speeds), median(mfus), time.perf_counter() - started)
    if primary:
        write_summary(run, summary, peak)
    return summary


def write_summary(run: pathlib.Path, summary: RunSummary, peak_flops: float) -> None:
    """run/summary.json: how this process's part of the run ended, its speed and the measured peak."""
    record = summary._asdict()
    record["validation"] = None if summary.validation is None else summary.validation._asdict()
    record["matmul_peak_gflops"] = peak_flops / 1e9
    (run / "summary.json").write_text(json.dumps(record, indent=2) + "\n")


def _restore(run_dir: str, model: LanguageModel, optimizer: nnx.Optimizer, step: int | None) -> int:
    """Load a run's checkpoint `step` (default: the latest) into model and optimizer, keeping their
    layout; returns its step."""
    checkpoints = Checkpoints(f"{run_dir}/checkpoints", async_save=False)
    try:
        return checkpoints.restore(model, optimizer, step)["step"]
    finally:
        checkpoints.close()


def load_model(run_dir: str, step: int | None = None) -> tuple[LanguageModel, RunConfig, int]:
    """The model of a run's checkpoint (default: the latest), its run config and its step.
    ValueError when the checkpoint does not fit the run's config.json."""
    config = load_run_config(run_dir)
    model, optimizer = build(config)
    return model, config, _restore(run_dir, model, optimizer, step)


def evaluate_checkpoint(
    run_dir: str, step: int | None = None, max_batches: int = 0, recall_ngram: int | None = None
) -> tuple[int, Evaluation]:
    """Validation loss, bits per byte and KV fraction of a run's checkpoint (default: the latest),
    data parallel over all devices whatever mesh the run was trained on; recall_ngram: as in
    `evaluate`."""
    config = load_run_config(run_dir)
    model, optimizer = build(config)
    steps = MeshSteps(model, optimizer, make_mesh())
    step = _restore(run_dir, model, optimizer, step)
    corpus = load_corpus(config)
    return step, evaluate(
        steps, corpus.validation, corpus.bytes_per_token, config.train.batch_size, max_batches, recall_ngram
    )
