"""The training loop and evaluation: data -> model -> loss -> optimizer, with checkpoints, metrics,
a progress bar, Ctrl-C handling and a stop on a non-finite loss."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Generator
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from hamjax.data import (
    Corpus, PackedRows, load_tokenizer, prepare_corpus, recall_hits, sequential_indices, streamed_corpus,
)
from hamjax.nn.model import LanguageModel
from hamjax.train.checkpoint import Checkpoints
from hamjax.train.config import RunConfig
from hamjax.train.flops import measure_matmul_peak, training_flops_per_token
from hamjax.train.optimizer import make_optimizer
from hamjax.train.plot import plot_run
from hamjax.train.run_folder import load_run_config, prepare_run_folder
from hamjax.train.sharding import batch_on_mesh, check_batch_size, global_rows, make_mesh
from hamjax.train.step import MeshSteps, bits_per_byte
from hamjax.train.step_log import StepLog
from hamjax.train.train_batches import training_batches
from hamjax.train.writers import MetricWriters


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
    evaluation (None when interrupted); tokens_per_s (scored tokens), steps_per_s and mfu: over the
    training steps of this process after the first (which compiles), evaluations and saves left out
    (nan when it trained one step or none)."""

    status: str
    step: int
    validation: Evaluation | None
    tokens_per_s: float
    steps_per_s: float
    mfu: float
    seconds: float


def load_corpus(config: RunConfig, progress: bool = False, processes: int | None = None) -> Corpus:
    """The run's tokenized, packed corpus, prepared on disk unless it already is (progress bars
    and `processes` as for `prepare_corpus`); ValueError if the tokenizer's vocabulary does not fit."""
    tokenizer = load_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"tokenizer {config.data.tokenizer!r} has {tokenizer.vocab_size} ids but vocab_size is "
            f"{config.model.vocab_size}; pass --vocab_size {tokenizer.vocab_size} or more"
        )
    d = config.data
    if d.streaming:
        return streamed_corpus(d.source, tokenizer, seq_len=d.seq_len, validation_fraction=d.validation_fraction,
                               validation_rows=config.train.eval_batches * config.train.batch_size,
                               text_field=d.text_field)
    return prepare_corpus(
        config.data.source,
        tokenizer,
        seq_len=config.data.seq_len,
        validation_fraction=config.data.validation_fraction,
        text_field=config.data.text_field,
        cache_dir=config.data.cache_dir or None,
        progress=progress,
        processes=processes,
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
    primary = jax.process_index() == 0  # the process that writes the run folder's files
    corpus = load_corpus(config, progress=progress and primary)
    model, optimizer = build(config)
    steps = MeshSteps(model, optimizer, mesh)
    run = prepare_run_folder(config, write=primary)
    checkpoints = Checkpoints(run / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpoints)
    start = 0
    if checkpoints.latest_step() is not None:
        start = checkpoints.restore(model, optimizer)["step"]
    writers = MetricWriters(run, config, resume_step=start, write=primary)
    peak = measure_matmul_peak()
    rows_per_step = tc.batch_size * tc.grad_accum
    record = lambda step: {"step": step, "data_position": step * rows_per_step, "seed": tc.seed}
    status, step, validation = "finished", start, None
    stop = _StopRequest()
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and primary), unit="step", dynamic_ncols=True)
    log = StepLog(
        writers.write, bar, bytes_per_token=corpus.bytes_per_token, peak_flops=peak,
        flops_per_token=training_flops_per_token(config.model, config.data.seq_len),
        checkpoint_message=lambda: _last_good_checkpoint(checkpoints),
    )
    make_batch = training_batches(config, corpus, mesh, run, start)
    batches = _prefetched(make_batch, range(start + 1, tc.steps + 1), tc.prefetch)
    profiler = _Profiler(run / "profile", tc.profile_range)
    try:
        for step, batch in zip(range(start + 1, tc.steps + 1), batches):
            profiler.before(step)
            log.add(step, steps.train(*batch))
            evaluating = step % tc.eval_every == 0 or step == tc.steps
            if step == start + 1 or step % tc.log_every == 0 or evaluating or profiler.ends_at(step):
                log.fetch()
            traced = profiler.after(step)
            if evaluating:
                validation = evaluate(steps, corpus.validation, corpus.bytes_per_token, tc.batch_size, tc.eval_batches)
                writers.write({"kind": "eval", "step": step, "loss": validation.loss, "bpb": validation.bpb,
                               "kv_fraction": validation.kv_fraction})
            stopping = stop.requested  # read once: a Ctrl-C from here on stops after the next step
            saving = step % tc.save_every == 0 or step == tc.steps or stopping
            if saving:
                log.fetch()  # a checkpoint is saved only once its steps are known to be finite
                make_batch.saved(step)  # before the checkpoint: a checkpoint never lacks its stream state
                checkpoints.save(step, model, optimizer, record(step))
            if evaluating or saving or traced:
                log.restart_clock()
            if stopping:
                status = "interrupted"
                break
    finally:
        batches.close()
        profiler.close()
        bar.close()
        stop.close()
        writers.close()
        checkpoints.wait()
        checkpoints.close()
    if primary:
        plot_run(run, config.model.kv_target)
    if status == "interrupted":
        validation = None
    elif validation is None or tc.eval_batches:  # the final step's evaluation was partial or did not run here
        validation = evaluate(steps, corpus.validation, corpus.bytes_per_token, tc.batch_size)
    summary = RunSummary(
        status, step, validation, log.tokens_per_s, log.steps_per_s, log.mfu(log.tokens_per_s),
        time.perf_counter() - started,
    )
    if primary:
        write_summary(run, summary, peak)
    return summary


def _last_good_checkpoint(checkpoints: Checkpoints) -> str:
    last = checkpoints.latest_step()
    if last is None:
        return "stopped before any checkpoint was saved"
    return f"stopped; the last good checkpoint is step {last} in {checkpoints.directory}"


def _prefetched(make: Callable[[int], object], steps: range, depth: int) -> Generator:
    """make(step) for each step, in order; depth > 0: computed up to `depth` steps ahead in a
    background thread (close() the generator to stop it)."""
    if depth == 0:
        yield from map(make, steps)
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hamjax-batches") as pool:
        ahead = collections.deque(pool.submit(make, step) for step in steps[:depth])
        try:
            for step in steps[depth:]:
                ahead.append(pool.submit(make, step))
                yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()


class _Profiler:
    """A JAX profiler trace of steps first..last (`span`; None: none) into `directory`, which
    TensorBoard's profile plugin opens. before(step) starts it at the first; the loop fetches the
    metrics of the last (ends_at), so that its work is done when after(step) stops the trace."""

    def __init__(self, directory: pathlib.Path, span: tuple[int, int] | None):
        self.directory, self.span, self.tracing = directory, span, False

    def before(self, step: int) -> None:
        if self.span is not None and step == self.span[0]:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def ends_at(self, step: int) -> bool:
        return self.tracing and step == self.span[1]

    def after(self, step: int) -> bool:
        """True when this step ended the trace."""
        ended = self.ends_at(step)
        if ended:
            self.close()
        return ended

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


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
