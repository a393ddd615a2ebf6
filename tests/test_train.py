"""hamjax.train and `hamjax train | eval`: the loss falls, resuming is bit-for-bit, gradient
accumulation, evaluation in batches of one shape, checkpoints, the threshold controller, the run
folder, and faults (non-finite loss, Ctrl-C, a kill during a save, bad command lines, a run folder
of another config).

Most tests share one reference run (`ref_run`: the tiny preset, 30 steps at a constant learning
rate, tau controlled toward a 25% KV fraction). In one process, runs of the same config share the
compiled train step; a new process compiles it again (about 20 s here), so subprocesses are used
only where a real process is needed (Ctrl-C, SIGKILL, the console script). The two training subprocesses start before the reference run,
so that their compilations overlap it (`background_runs`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hamjax.cli.flags import config_from_flags
from hamjax.cli.main import build_parser, main
from hamjax.data import PackedRows, batch_at, recall_hits, target_mask
from hamjax.nn.model import LanguageModel
from hamjax.train import (
    Checkpoints,
    NonFiniteLoss,
    TrainConfig,
    bits_per_byte,
    learning_rate_schedule,
    make_optimizer,
    preset,
    train,
    train_step,
    weight_decay_mask,
)
from hamjax.train import loop
from hamjax.train import step as step_module
from hamjax.train.config import config_from_dict
from hamjax.train.loop import build, load_corpus
from hamjax.train.run_folder import prepare_run_folder, read_metrics
from hamjax.train.sharding import batch_on_mesh, make_mesh
from oracles import rel_rms

HAMJAX = str(pathlib.Path(sys.executable).with_name("hamjax"))
STEPS = 30
KV_TARGET = 0.25
# The reference run: constant learning rate after 2 warmup steps, a fast threshold controller, and a
# validation split of 2 chapters (the full validation at the end of a run takes a second, not ten).
REF_FLAGS = [
    "--preset", "tiny", "--steps", str(STEPS), "--warmup_steps", "2", "--min_lr_ratio", "1.0",
    "--kv_target", str(KV_TARGET), "--tau_lr", "1.0", "--validation_fraction", "0.002",
]
COMPARED = ("loss", "grad_norm", "kv_fraction", "tau")  # the train records' deterministic fields


def run_config(run_dir, *flags):
    """The RunConfig `hamjax train REF_FLAGS --run_dir run_dir flags` would use."""
    args = build_parser().parse_args(["train", *REF_FLAGS, "--run_dir", str(run_dir), *flags])
    return config_from_flags(args)


def records(run_dir, kind="train"):
    return [r for r in read_metrics(pathlib.Path(run_dir) / "metrics.jsonl") if r["kind"] == kind]


def checkpoint_state(run_dir, step=None):
    """(record, model state, optimizer state) of a run's checkpoint, restored into a fresh model."""
    config = run_config(run_dir)
    model, optimizer = build(config)
    checkpoints = Checkpoints(pathlib.Path(run_dir) / "checkpoints", async_save=False)
    try:
        record = checkpoints.restore(model, optimizer, step)
    finally:
        checkpoints.close()
    return record, nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(optimizer))


def assert_trees_equal(actual, expected, what=""):
    """Same structure; every leaf bit-for-bit equal."""
    flat_actual, tree_actual = jax.tree_util.tree_flatten_with_path(actual)
    flat_expected, tree_expected = jax.tree_util.tree_flatten_with_path(expected)
    assert tree_actual == tree_expected, f"{what}: structures differ"
    assert flat_actual, f"{what}: empty"
    for (path, a), (_, e) in zip(flat_actual, flat_expected):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape, (what, jax.tree_util.keystr(path))
        assert np.array_equal(a, e), f"{what}{jax.tree_util.keystr(path)} differs"



def assert_same_train_records(actual, expected):
    assert [r["step"] for r in actual] == list(range(1, STEPS + 1))
    for a, e in zip(actual, expected):
        for key in COMPARED:
            assert a[key] == e[key], f"step {a['step']}: {key} {a[key]} != {e[key]}"


def all_finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(leaf).dtype, np.floating))


class StopAfter:
    """Stands in for loop._StopRequest: the "Ctrl-C" arrives during train step `n` of this process
    (counted by the wrapped MeshSteps.train installed by `stop_after`)."""

    instances: list = []

    def __init__(self):
        self.requested = False
        StopAfter.instances.append(self)

    def close(self):
        pass


def stop_after(monkeypatch, n: int) -> None:
    calls = []
    real_step = loop.MeshSteps.train

    def counting_step(*args):
        metrics = real_step(*args)
        calls.append(1)
        if len(calls) == n:
            StopAfter.instances[-1].requested = True
        return metrics

    monkeypatch.setattr(loop, "_StopRequest", StopAfter)
    monkeypatch.setattr(loop.MeshSteps, "train", counting_step)


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory, request):
    if any("background_runs" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("background_runs")  # start the subprocesses first: they compile meanwhile
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    summary = train(run_config(run_dir), progress=False)
    return run_dir, summary


# --- training works --------------------------------------------------------------------------------


def test_reference_run_finishes(ref_run):
    run_dir, summary = ref_run
    assert summary.status == "finished" and summary.step == STEPS
    assert np.isfinite(summary.validation.loss) and np.isfinite(summary.validation.bpb)
    assert len(summary.validation.kv_fraction) == 2
    assert summary.tokens_per_s > 0 and 0 < summary.mfu < 1


def test_loss_falls(ref_run):
    losses = [r["loss"] for r in records(ref_run[0])]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert losses[0] > 5.0  # about log(256): an untrained byte model
    assert np.mean(losses[-5:]) < losses[0] - 0.5, losses


def test_threshold_controller_moves_tau_toward_target(ref_run):
    train_records = records(ref_run[0])
    tau_init = preset("tiny").model.tau_init
    first_kv = np.array(train_records[0]["kv_fraction"])
    last_kv = np.mean([r["kv_fraction"] for r in train_records[-5:]], axis=0)
    taus = np.array([r["tau"] for r in train_records])
    # The first update: log tau moved by tau_lr * (measured - target), exactly.
    np.testing.assert_allclose(np.log(taus[0]), np.log(tau_init) + 1.0 * (first_kv - KV_TARGET), rtol=1e-5)
    for layer in range(len(first_kv)):
        assert abs(last_kv[layer] - KV_TARGET) < abs(first_kv[layer] - KV_TARGET), (layer, first_kv, last_kv)
        # tau moved in the direction that brings the fraction to the target
        assert np.sign(taus[-1, layer] - tau_init) == np.sign(first_kv[layer] - KV_TARGET), (layer, taus[:, layer])


def test_run_folder_contents(ref_run):
    run_dir, _ = ref_run
    saved = json.loads((run_dir / "config.json").read_text())
    assert config_from_dict(saved) == run_config(run_dir)
    train_records, eval_records = records(run_dir), records(run_dir, "eval")
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    assert [r["step"] for r in eval_records] == [10, 20, 30]
    for r in train_records:
        assert {"loss", "bpb", "grad_norm", "kv_fraction", "tau", "tokens_per_s", "mfu"} <= set(r)
    for r in eval_records:
        assert {"loss", "bpb", "kv_fraction"} <= set(r) and len(r["kv_fraction"]) == 2
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 20, 30]  # keep_checkpoints 3
    png = (run_dir / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(run_dir / "plot.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_eval_command_matches_final_validation(ref_run, capsys):
    run_dir, summary = ref_run
    assert main(["eval", "--run_dir", str(run_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    result = json.loads(lines[0])
    assert {"step", "loss", "bpb", "kv_fraction"} <= set(result)
    assert result["step"] == STEPS
    assert result["bpb"] == pytest.approx(summary.validation.bpb, rel=1e-9, abs=0)
    assert result["loss"] == pytest.approx(summary.validation.loss, rel=1e-9, abs=0)
    np.testing.assert_allclose(result["kv_fraction"], summary.validation.kv_fraction, rtol=1e-9)


def test_eval_command_splits_recall_hits(ref_run, capsys):
    """hamjax eval --recall_ngram 2: the hits' and the rest's bits per byte, and their token counts
    that add up to the whole's."""
    run_dir, summary = ref_run
    assert main(["eval", "--run_dir", str(run_dir), "--recall_ngram", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bpb"] == pytest.approx(summary.validation.bpb, rel=1e-9, abs=0)
    assert 0 < result["hit_tokens"] < result["tokens"] == result["hit_tokens"] + result["other_tokens"]
    assert result["hit_bpb"] > 0 and result["other_bpb"] > 0


def test_rerunning_a_finished_run_trains_nothing(ref_run):
    run_dir, summary = ref_run
    before = (run_dir / "metrics.jsonl").read_text()
    again = train(run_config(run_dir, "--eval_every", "5"), progress=False)  # bookkeeping may change
    assert again.status == "finished" and again.step == STEPS
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert again.validation.bpb == pytest.approx(summary.validation.bpb, rel=1e-9)


# --- bookkeeping: metrics read back every step, batches built in the loop, writers, a trace --------

PER_STEP_FLAGS = ["--log_every", "1", "--prefetch", "0", "--metrics", "jsonl,tensorboard,wandb", "--profile_steps", "3:4"]


@pytest.fixture(scope="module")
def per_step_run(tmp_path_factory, ref_run):
    """The reference run with every bookkeeping option the other way: metrics fetched every step
    (the reference fetches every 10), batches built in the loop (the reference builds 2 ahead), TensorBoard
    and an offline W&B run, and a profiler trace of steps 3-4."""
    run_dir = tmp_path_factory.mktemp("per_step") / "run"
    return run_dir, train(run_config(run_dir, *PER_STEP_FLAGS), progress=False)


def test_metrics_every_10_steps_and_prefetching_train_bit_for_bit_as_every_step(ref_run, per_step_run):
    assert preset("tiny").train.log_every == 10 and preset("tiny").train.prefetch == 2  # what ref_run used
    (ref_dir, ref_summary), (run_dir, summary) = ref_run, per_step_run
    record, model, optimizer = checkpoint_state(run_dir)
    ref_record, ref_model, ref_optimizer = checkpoint_state(ref_dir)
    assert record == ref_record
    assert_trees_equal(model, ref_model, "model")
    assert_trees_equal(optimizer, ref_optimizer, "optimizer")
    assert_same_train_records(records(run_dir), records(ref_dir))
    assert summary.validation == ref_summary.validation
    assert summary.tokens_per_s > 0 and ref_summary.tokens_per_s > 0


def test_tensorboard_events_hold_the_metrics_records(per_step_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = per_step_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]
    train_records, eval_records = records(run_dir), records(run_dir, "eval")
    as_float32 = lambda x: float(np.float32(x))
    assert scalars("train/loss") == [(r["step"], as_float32(r["loss"])) for r in train_records]
    for layer in range(2):
        assert scalars(f"train/kv_fraction/layer_{layer}") == [
            (r["step"], as_float32(r["kv_fraction"][layer])) for r in train_records]
        assert scalars(f"train/tau/layer_{layer}") == [(r["step"], as_float32(r["tau"][layer])) for r in train_records]
        assert scalars(f"eval/kv_fraction/layer_{layer}") == [
            (r["step"], as_float32(r["kv_fraction"][layer])) for r in eval_records]
    assert scalars("eval/bpb") == [(r["step"], as_float32(r["bpb"])) for r in eval_records]
    assert {"train/grad_norm", "train/tokens_per_s", "train/mfu", "eval/loss"} <= set(events.Tags()["scalars"])
    (text,) = events.Tensors("hyperparameters/text_summary")
    assert '"train.log_every": 1' in text.tensor_proto.string_val[0].decode()


def test_wandb_runs_offline_and_holds_the_metrics(per_step_run):
    run_dir, _ = per_step_run
    (history,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = history.read_bytes()  # W&B's own records (protobuf); names and JSON values appear as written
    for name in ("train/loss", "train/kv_fraction/layer_1", "train/tau/layer_0", "eval/bpb", "train.log_every"):
        assert name.encode() in data, name
    assert json.dumps(records(run_dir)[-1]["loss"]).encode() in data


def test_profile_steps_write_a_trace_tensorboard_opens(per_step_run):
    run_dir, _ = per_step_run
    traces = list((run_dir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_batches_come_in_order_and_stop_when_closed(depth):
    made = []

    def make(step):
        made.append(step)
        return step * 10

    assert list(loop._prefetched(make, range(1, 6), depth)) == [10, 20, 30, 40, 50]
    assert list(loop._prefetched(make, range(1, 1), depth)) == []
    made.clear()
    batches = loop._prefetched(make, range(1, 100), depth)
    assert next(batches) == 10
    batches.close()
    assert max(made) <= 1 + depth, made  # no more than depth batches were built ahead


def test_non_finite_loss_between_fetches_names_its_step(tmp_path, capsys):
    """As below, with metrics read every 10 steps and no save before step 10: the NaN of step 2 is
    found at step 10's fetch, before that step's checkpoint would be saved."""
    run_dir = tmp_path / "run"
    flags = ["--learning_rate", "1e6", "--clip_norm", "1e9", "--warmup_steps", "0", "--save_every", "10",
             "--log_every", "10"]
    assert main(["train", *REF_FLAGS, "--run_dir", str(run_dir), *flags, "--quiet"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "at step 2:" in line and "before any checkpoint was saved" in line, line
    assert [r["step"] for r in records(run_dir)] == [1]
    assert checkpoint_listing(run_dir) == ([], [])


# --- resuming --------------------------------------------------------------------------------------


def test_resume_is_bit_for_bit(ref_run, tmp_path, monkeypatch):
    """30 steps in one go == 15 steps, a stop request, then the same command again."""
    config = run_config(tmp_path / "run")
    stop_after(monkeypatch, STEPS // 2)
    first = train(config, progress=False)
    monkeypatch.undo()
    assert first.status == "interrupted" and first.step == STEPS // 2 and first.validation is None
    assert [r["step"] for r in records(config.run_dir)] == list(range(1, STEPS // 2 + 1))
    second = train(config, progress=False)
    assert second.status == "finished" and second.step == STEPS

    ref_dir, ref_summary = ref_run
    record, model, optimizer = checkpoint_state(config.run_dir)
    ref_record, ref_model, ref_optimizer = checkpoint_state(ref_dir)
    assert record == ref_record
    assert_trees_equal(model, ref_model, "model")
    assert_trees_equal(optimizer, ref_optimizer, "optimizer")
    assert_same_train_records(records(config.run_dir), records(ref_dir))
    evals, ref_evals = records(config.run_dir, "eval"), records(ref_dir, "eval")
    assert [(r["step"], r["loss"], r["kv_fraction"]) for r in evals] == [
        (r["step"], r["loss"], r["kv_fraction"]) for r in ref_evals
    ]
    assert second.validation == ref_summary.validation


def test_resuming_with_another_config_fails_in_one_line(ref_run, capsys):
    run_dir, _ = ref_run
    before = (run_dir / "config.json").read_text()
    assert main(["train", *REF_FLAGS, "--run_dir", str(run_dir), "--d_model", "64", "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "d_model" in lines[0] and "Traceback" not in err
    assert "steps" not in lines[0]  # only the field that differs
    assert (run_dir / "config.json").read_text() == before


# --- gradient accumulation -------------------------------------------------------------------------


def test_gradient_accumulation_matches_one_big_batch():
    """grad_accum 2 x batch 2 == grad_accum 1 x batch 4 on the same rows, for the first step (one HAM
    layer; rows of unequal scored-target counts, so a mean of per-micro-batch means would differ)."""
    tiny = preset("tiny")
    model_config = dataclasses.replace(tiny.model, n_layers=1, pattern="ham")
    train_config = TrainConfig(warmup_steps=0, learning_rate=1e-3)
    corpus = load_corpus(tiny)
    batch = batch_at(corpus.train, 0, 4, 0)
    rows = jnp.asarray(batch.tokens[:, :33])
    segment_ids = np.zeros((4, 33), np.int32)
    segment_ids[0, 10:] = 1  # a document boundary in micro-batch 0 only
    segment_ids[1, 20:] = 1
    segment_ids = jnp.asarray(segment_ids)

    model = LanguageModel(model_config, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, train_config)
    split_model, split_optimizer = nnx.clone((model, optimizer))
    initial = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    # The loss by hand: mean next-token cross-entropy over targets within one document.
    logits, _ = nnx.jit(lambda m, r, s: m(r, segment_ids=s))(model, rows[:, :-1], segment_ids[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:])
    mask = target_mask(segment_ids)
    expected_loss = float(jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.sum(mask))

    whole = train_step(model, optimizer, rows[None], segment_ids[None])
    split = train_step(split_model, split_optimizer, rows.reshape(2, 2, -1), segment_ids.reshape(2, 2, -1))
    assert int(whole.tokens) == int(split.tokens) == 4 * 32 - 2
    assert float(whole.loss) == pytest.approx(expected_loss, rel=1e-5)
    assert float(split.loss) == pytest.approx(float(whole.loss), rel=1e-5)
    assert float(split.grad_norm) == pytest.approx(float(whole.grad_norm), rel=1e-5)
    np.testing.assert_allclose(split.kv_fraction, whole.kv_fraction, rtol=1e-6)
    np.testing.assert_allclose(split.tau, whole.tau, rtol=1e-6)

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    split_params = nnx.to_pure_dict(nnx.state(split_model, nnx.Param))
    moved = 0
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), s, p0 in zip(flat, jax.tree.leaves(split_params), jax.tree.leaves(initial)):
        name = jax.tree_util.keystr(path)
        assert rel_rms(s, p) <= 1e-5, name
        moved += not np.array_equal(p, p0)
    assert moved == len(flat)  # every parameter took the step
    assert int(optimizer.step[...]) == int(split_optimizer.step[...]) == 1


def test_a_rematerialised_model_takes_the_same_step(micro_batches=2):
    """remat=True (every block recomputed in the backward pass, as the paper preset trains) gives the
    training step of remat=False: loss, gradient norm, KV fractions, thresholds and every updated
    parameter, for a model with every block kind, over two micro-batches (the scanned accumulation;
    test_model checks the rematerialised gradients of one batch)."""
    tiny = preset("tiny")
    rows, segment_ids = (jnp.asarray(a).reshape(micro_batches, 4 // micro_batches, -1)
                         for a in batch_at(load_corpus(tiny).train, 0, 4, 0)[:2])
    steps = {}
    for remat in (False, True):
        model_config = dataclasses.replace(tiny.model, n_layers=4, pattern="ham,gdn,attention,swa", remat=remat)
        model = LanguageModel(model_config, rngs=nnx.Rngs(0))
        optimizer = make_optimizer(model, TrainConfig(warmup_steps=0, learning_rate=1e-3))
        steps[remat] = train_step(model, optimizer, rows, segment_ids), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    (plain, params), (remat, remat_params) = steps[False], steps[True]
    for field in ("loss", "grad_norm", "kv_fraction", "tau"):
        np.testing.assert_allclose(getattr(remat, field), getattr(plain, field), rtol=1e-5, err_msg=field)
    for (path, p), r in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(remat_params)):
        assert rel_rms(r, p) <= 1e-5, jax.tree_util.keystr(path)


def test_same_config_reuses_the_compiled_train_step():
    """train_step is compiled by nnx.jit per graph definition of its (model, optimizer) arguments.
    Two builds of one config must have equal definitions, or every train() call in a process (each
    resume, each run of a sweep or notebook) compiles the step again (~20 s for the tiny preset here)."""
    config = preset("tiny")
    swept = dataclasses.replace(config, train=dataclasses.replace(config.train, learning_rate=1e-2, seed=7))
    (model, optimizer), (model_again, optimizer_again) = build(config), build(swept)
    assert nnx.graphdef(model) == nnx.graphdef(model_again)
    assert nnx.graphdef(optimizer) == nnx.graphdef(optimizer_again), (
        "make_optimizer builds a new optax transformation for each call or each learning rate"
    )


@pytest.mark.parametrize("learning_rate", [3e-3, 1e-2])
def test_optimizer_steps_as_optax_adamw(learning_rate):
    """make_optimizer (peak learning rate in the state) updates the parameters as clipping then
    optax.adamw with the schedule built from the config, over steps in warmup and in decay."""
    model_config = dataclasses.replace(preset("tiny").model, n_layers=1, pattern="ham")
    config = TrainConfig(steps=6, warmup_steps=2, learning_rate=learning_rate, weight_decay=0.3, clip_norm=0.5)
    model = LanguageModel(model_config, rngs=nnx.Rngs(0))
    reference_model = nnx.clone(model)
    optimizer = make_optimizer(model, config)
    reference = nnx.Optimizer(reference_model, optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(learning_rate_schedule(config), b1=config.beta1, b2=config.beta2,
                    weight_decay=config.weight_decay, mask=weight_decay_mask(reference_model)),
    ), wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    for step in range(5):
        keys = iter(jax.random.split(jax.random.PRNGKey(step), len(jax.tree.leaves(params))))
        grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)
        optimizer.update(model, grads)
        reference.update(reference_model, grads)
    got = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    want = jax.tree.leaves(nnx.to_pure_dict(nnx.state(reference_model, nnx.Param)))
    for (path, p), r in zip(got, want):
        np.testing.assert_allclose(p, r, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))


# --- evaluation ------------------------------------------------------------------------------------

EVAL_ROWS, EVAL_BATCH = 7, 3  # batches of 3, 3 and 1 rows


@pytest.fixture(scope="module")
def short_last_batch():
    """loop.evaluate of 7 rows of 33 tokens (two with a document boundary) in batches of 3 by a
    one-HAM-layer tiny model, its evaluation step compiled afresh with its traces counted.
    -> (Evaluation, traces, MeshSteps, rows, bytes_per_token)."""
    tiny = preset("tiny")
    model, optimizer = build(dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, n_layers=1, pattern="ham")))
    corpus = load_corpus(tiny)
    tokens = corpus.validation.tokens[:EVAL_ROWS, :33]
    segment_ids = np.zeros_like(tokens)
    segment_ids[1, 12:] = 1
    segment_ids[6, 20:] = 1  # the padded batch's real row
    rows = PackedRows(tokens, segment_ids)
    traces, real_eval_sums = [], step_module._eval_sums

    def counted(*args):
        traces.append(1)
        return real_eval_sums(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step_module, "_eval_sums", counted)
        patch.setattr(step_module, "_compiled_eval", functools.lru_cache(step_module._compiled_eval.__wrapped__))
        steps = loop.MeshSteps(model, optimizer, make_mesh())
        evaluation = loop.evaluate(steps, rows, corpus.bytes_per_token, EVAL_BATCH)
    return evaluation, len(traces), steps, rows, corpus.bytes_per_token


def test_evaluation_compiles_once_for_a_short_last_batch(short_last_batch):
    """The last batch (1 row of 3) is padded to the others' shape: no second compilation."""
    _, traces, *_ = short_last_batch
    assert traces == 1


def test_evaluation_splits_the_loss_into_recall_hits_and_the_rest(short_last_batch):
    """With recall_ngram, the hits' and the rest's tokens add up to all scored targets and their
    bits per byte recombine to the whole's; the hits' loss equals the mean per-target loss over
    data.recall_hits, computed from the logits of one unpadded pass (padding changes nothing)."""
    evaluation, _, steps, rows, bytes_per_token = short_last_batch
    split = loop.evaluate(steps, rows, bytes_per_token, EVAL_BATCH, recall_ngram=2)
    assert split[:4] == evaluation[:4] and evaluation.hit_bpb is None
    assert 0 < split.hit_tokens < split.tokens and split.hit_tokens + split.other_tokens == split.tokens
    recombined = (split.hit_bpb * split.hit_tokens + split.other_bpb * split.other_tokens) / split.tokens
    assert recombined == pytest.approx(split.bpb, rel=1e-5)
    model, _ = steps.objects
    logits, _ = model(jnp.asarray(rows.tokens[:, :-1]), segment_ids=jnp.asarray(rows.segment_ids[:, :-1]))
    losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, rows.tokens[:, 1:]))
    hits = recall_hits(rows.tokens, rows.segment_ids, 2)
    assert split.hit_tokens == hits.sum()
    assert split.hit_bpb == pytest.approx(bits_per_byte(losses[hits].mean(), bytes_per_token), rel=1e-5)


def test_padding_rows_count_for_nothing(short_last_batch):
    """The padded evaluation equals one unpadded batch of all the rows: loss, bits per byte, scored
    targets and KV fraction (row-weighted over batches = over all the rows' tokens)."""
    evaluation, _, steps, rows, bytes_per_token = short_last_batch
    loss_sum, tokens, kv, _, _ = steps.evaluate(*batch_on_mesh(*rows, np.arange(EVAL_ROWS), steps.mesh))
    loss = float(loss_sum) / int(tokens)
    assert evaluation.tokens == int(tokens) == EVAL_ROWS * 32 - 2
    assert evaluation.loss == pytest.approx(loss, rel=1e-5)
    assert evaluation.bpb == pytest.approx(bits_per_byte(loss, bytes_per_token), rel=1e-5)
    assert 0.0 < evaluation.kv_fraction[0] < 1.0
    np.testing.assert_allclose(evaluation.kv_fraction, np.asarray(kv), rtol=1e-5)


# --- checkpoints -----------------------------------------------------------------------------------


def perturbed_model_and_optimizer(config, seed):
    """A model and optimizer whose every state leaf differs from a fresh build: random parameters
    and optimizer moments, moved thresholds, step counters."""
    model, optimizer = build(config)
    rng = np.random.default_rng(seed)

    def perturb(x):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            return jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype))
        return jnp.asarray(x + 7 + rng.integers(0, 5, x.shape).astype(x.dtype))

    nnx.update(model, jax.tree.map(perturb, nnx.state(model)))
    nnx.update(optimizer, jax.tree.map(perturb, nnx.state(optimizer)))
    return model, optimizer


def test_checkpoint_round_trip(tmp_path):
    config = preset("tiny")
    model, optimizer = perturbed_model_and_optimizer(config, 0)
    taus = [float(layer.tau) for layer in model.ham_layers]
    threshold_steps = [int(layer.threshold.get_value().step) for layer in model.ham_layers]
    assert taus[0] != preset("tiny").model.tau_init and threshold_steps[0] > 0
    record = {"step": 5, "data_position": 20, "seed": 0, "note": "anything JSON"}
    saver = Checkpoints(tmp_path / "checkpoints", async_save=True)
    saver.save(5, model, optimizer, record)
    saver.wait()
    saver.close()

    fresh_model, fresh_optimizer = build(config)
    fresh = nnx.to_pure_dict(nnx.state(fresh_model))
    loader = Checkpoints(tmp_path / "checkpoints")
    assert loader.latest_step() == 5
    assert loader.restore(fresh_model, fresh_optimizer) == record
    loader.close()
    assert_trees_equal(nnx.to_pure_dict(nnx.state(fresh_model)), nnx.to_pure_dict(nnx.state(model)), "model")
    assert_trees_equal(
        nnx.to_pure_dict(nnx.state(fresh_optimizer)), nnx.to_pure_dict(nnx.state(optimizer)), "optimizer"
    )
    assert [float(layer.tau) for layer in fresh_model.ham_layers] == taus
    assert [int(layer.threshold.get_value().step) for layer in fresh_model.ham_layers] == threshold_steps
    assert int(fresh_optimizer.step[...]) == int(optimizer.step[...])
    with pytest.raises(AssertionError):  # the perturbation was not a no-op
        assert_trees_equal(fresh, nnx.to_pure_dict(nnx.state(model)), "fresh")


def test_checkpoints_keep_their_dtypes_and_refuse_another(tmp_path):
    """A run with bfloat16 weights restores them as bfloat16, equal; restored into a float32 model
    it raises naming the array and both dtypes (Orbax alone would cast silently). Resuming a run
    folder under another dtype policy names the field."""
    config = dataclasses.replace(preset("tiny"), run_dir=str(tmp_path / "run"))
    bf16 = dataclasses.replace(config, model=dataclasses.replace(config.model, param_dtype="bfloat16"))
    model, optimizer = build(bf16)
    saver = Checkpoints(tmp_path / "checkpoints", async_save=False)
    saver.save(1, model, optimizer, {"step": 1})
    saver.close()
    fresh_model, fresh_optimizer = build(dataclasses.replace(bf16, train=dataclasses.replace(bf16.train, seed=1)))
    loader = Checkpoints(tmp_path / "checkpoints")
    loader.restore(fresh_model, fresh_optimizer)
    restored, saved = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (fresh_model, model))
    dtypes = lambda tree: jax.tree.map(lambda a: a.dtype, tree)
    assert dtypes(restored) == dtypes(saved) and jnp.dtype(jnp.bfloat16) in jax.tree.leaves(dtypes(saved))
    assert_trees_equal(restored, saved, "model")
    with pytest.raises(ValueError, match=r"holds .*embed.* as bfloat16, but this model has it as float32"):
        loader.restore(*build(config))
    loader.close()
    prepare_run_folder(bf16)
    (pathlib.Path(bf16.run_dir) / "checkpoints" / "1").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"model.param_dtype: 'bfloat16' -> 'float32'"):
        prepare_run_folder(config)


def test_restore_without_checkpoint_raises(tmp_path):
    model, optimizer = build(preset("tiny"))
    checkpoints = Checkpoints(tmp_path / "empty")
    try:
        assert checkpoints.latest_step() is None
        with pytest.raises(FileNotFoundError):
            checkpoints.restore(model, optimizer)
    finally:
        checkpoints.close()


def fake_incomplete_checkpoint(directory: pathlib.Path, step: int, suffix: str = "") -> pathlib.Path:
    """A step folder as orbax names it while a save is in progress, holding garbage: orbax-checkpoint
    0.12.8 writes "<step>.orbax-checkpoint-tmp" and renames it "<step>" once complete (earlier
    versions appended "-<timestamp>": pass it as `suffix`)."""
    folder = directory / f"{step}.orbax-checkpoint-tmp{suffix}"
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "_METADATA").write_bytes(b"\x00garbage{")
    (folder / "_CHECKPOINT_METADATA").write_text("{not json")
    return folder


def test_incomplete_checkpoint_folders_are_ignored(tmp_path):
    config = preset("tiny")
    model, optimizer = perturbed_model_and_optimizer(config, 1)
    directory = tmp_path / "checkpoints"
    checkpoints = Checkpoints(directory, async_save=False)
    checkpoints.save(3, model, optimizer, {"step": 3})
    checkpoints.close()
    fake_incomplete_checkpoint(directory, 4)
    fake_incomplete_checkpoint(directory, 5, "-1700000000123456")

    checkpoints = Checkpoints(directory, async_save=False)
    try:
        assert checkpoints.latest_step() == 3
        assert checkpoints.manager.all_steps() == [3]
        fresh_model, fresh_optimizer = build(config)
        assert checkpoints.restore(fresh_model, fresh_optimizer) == {"step": 3}
        assert_trees_equal(nnx.to_pure_dict(nnx.state(fresh_model)), nnx.to_pure_dict(nnx.state(model)), "model")
        for step in (4, 5):  # the leftovers do not block new saves of their steps
            checkpoints.save(step, model, optimizer, {"step": step})
        assert checkpoints.manager.all_steps() == [3, 4, 5]
        fresh_model, fresh_optimizer = build(config)
        assert checkpoints.restore(fresh_model, fresh_optimizer) == {"step": 5}
    finally:
        checkpoints.close()


# --- faults ----------------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path, capsys):
    """A learning rate of 1e6 without clipping: step 1 is finite, step 2 is NaN."""
    run_dir = tmp_path / "run"
    flags = ["--learning_rate", "1e6", "--clip_norm", "1e9", "--warmup_steps", "0", "--save_every", "1"]
    assert main(["train", *REF_FLAGS, "--run_dir", str(run_dir), *flags, "--quiet"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    good = [r["step"] for r in records(run_dir)]
    assert good and all(np.isfinite(r["loss"]) for r in records(run_dir))
    bad_step, last_good = good[-1] + 1, good[-1]
    assert f"step {bad_step}" in lines[0] and f"step {last_good} " in lines[0], lines[0]
    assert str(run_dir / "checkpoints") in lines[0]
    record, model, optimizer = checkpoint_state(run_dir)
    assert record["step"] == last_good
    assert all_finite(model) and all_finite(optimizer)


def test_non_finite_gradient_is_not_called_a_good_checkpoint(tmp_path, monkeypatch):
    """A loss that is finite while its gradient is NaN (0 * sqrt at 0, a classic): the update of
    step 1 makes every parameter NaN, and step 2's loss is NaN. The checkpoint that NonFiniteLoss
    names as the last good one must restore with finite parameters."""
    real_loss_sum = step_module.summed_loss

    def loss_sum_with_nan_gradient(model, rows, segment_ids):
        loss, stats = real_loss_sum(model, rows, segment_ids)
        scale = model.final_norm.scale[...]  # ones at initialisation: sqrt(|scale - 1|) = 0, d/dx = inf
        return loss + 0.0 * jnp.sum(jnp.sqrt(jnp.abs(scale - 1.0))), stats

    monkeypatch.setattr(step_module, "summed_loss", loss_sum_with_nan_gradient)
    # Compiled afresh: a step compiled by an earlier test for the same graph would skip the patch.
    monkeypatch.setattr(step_module, "_compiled_train", functools.lru_cache(step_module._compiled_train.__wrapped__))
    config = run_config(tmp_path / "run", "--save_every", "1")
    with pytest.raises(NonFiniteLoss) as error:
        train(config, progress=False)
    monkeypatch.undo()
    message = str(error.value)
    stopped = [r["step"] for r in records(config.run_dir)]
    assert stopped in ([], [1]), stopped  # step 2's loss is NaN; a check of the gradient stops at step 1
    assert all(np.isfinite(r["loss"]) for r in records(config.run_dir))
    named = re.search(r"last good checkpoint is step (\d+)", message)
    if named is None:
        assert "before any checkpoint" in message, message
    else:
        _, model, _ = checkpoint_state(config.run_dir, int(named.group(1)))
        assert all_finite(model), (
            f"NonFiniteLoss calls checkpoint {named.group(1)} the last good one, but its parameters are NaN: {message}"
        )


def wait_for(condition, timeout, what, proc=None):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class BackgroundRun:
    """`hamjax train ARGV` in a subprocess whose watcher thread waits for `ready()`, then calls
    `act(proc)` (a signal) and waits up to 90 s for the process to end. Started before the reference
    run, so that its XLA compilation overlaps the in-process tests (this machine has 2 cores)."""

    def __init__(self, folder: pathlib.Path, argv: list[str], ready, act, what: str):
        self.stdout, self.stderr = folder / "stdout", folder / "stderr"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.proc = subprocess.Popen([HAMJAX, *argv], stdout=out, stderr=err)
        self.ready, self.act, self.what = ready, act, what
        self.error = self.seconds_to_exit = None
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        try:
            wait_for(self.ready, 400, self.what, self.proc)
            acted = time.monotonic()
            self.act(self.proc)
            self.proc.wait(timeout=90)
            self.seconds_to_exit = time.monotonic() - acted
        except Exception as error:  # reported by result()
            self.error = error
        finally:
            self.stop()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def result(self) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once the process has ended."""
        self.thread.join(timeout=500)
        stdout, stderr = self.stdout.read_text(), self.stderr.read_text()
        if self.error is not None:
            raise AssertionError(f"{self.error}\nstdout: {stdout}\nstderr: {stderr}")
        return self.proc.returncode, stdout, stderr


CTRL_C_ARGV = ["train", "--preset", "tiny", "--steps", "200", "--save_every", "1000", "--quiet"]
KILL_FLAGS = ["--save_every", "1", "--keep_checkpoints", "3", "--async_checkpoints"]


def checkpoint_listing(run_dir) -> tuple[list[int], list[str]]:
    """(complete steps, unfinished save folders) in run_dir/checkpoints."""
    try:
        names = os.listdir(pathlib.Path(run_dir) / "checkpoints")
    except FileNotFoundError:
        return [], []
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if "orbax-checkpoint-tmp" in n]


@pytest.fixture(scope="module")
def background_runs(tmp_path_factory):
    """The two subprocess runs of the fault tests: Ctrl-C after 2 train records, and SIGKILL while
    asynchronous saves (one per step) are in flight."""
    ctrl_c_dir = tmp_path_factory.mktemp("ctrl_c")
    kill_dir = tmp_path_factory.mktemp("kill")
    at_kill = {}

    def saving():
        complete, unfinished = checkpoint_listing(kill_dir / "run")
        if (unfinished and max(complete, default=0) >= 3) or max(complete, default=0) >= 6:
            at_kill.update(complete=complete, unfinished=unfinished)
            return True
        return False

    runs = {
        "ctrl_c": BackgroundRun(
            ctrl_c_dir, [*CTRL_C_ARGV, "--run_dir", str(ctrl_c_dir / "run")],
            lambda: len(records(ctrl_c_dir / "run")) >= 2, lambda proc: proc.send_signal(signal.SIGINT),
            "2 train records",
        ),
        "kill": BackgroundRun(
            kill_dir, ["train", *REF_FLAGS, "--run_dir", str(kill_dir / "run"), *KILL_FLAGS, "--quiet"],
            saving, lambda proc: proc.send_signal(signal.SIGKILL), "checkpoint 3 and a save in flight",
        ),
    }
    runs["kill"].at_kill = at_kill
    yield runs
    for run in runs.values():
        run.stop()


def test_ctrl_c_saves_and_the_same_command_resumes(background_runs, monkeypatch, capsys):
    run = background_runs["ctrl_c"]
    code, stdout, stderr = run.result()
    run_dir = run.stdout.parent / "run"
    assert code == 130, (code, stdout, stderr)
    assert run.seconds_to_exit < 60
    assert "Traceback" not in stderr, stderr
    stopped = records(run_dir)[-1]["step"]
    assert 2 <= stopped < 200
    assert f"interrupted at step {stopped}" in stdout, stdout
    assert checkpoint_listing(run_dir) == ([stopped], [])

    # The same command again resumes from that step: let it take one step, then Ctrl-C once more.
    real_step = loop.MeshSteps.train

    def step_then_ctrl_c(*args):
        metrics = real_step(*args)
        signal.raise_signal(signal.SIGINT)
        return metrics

    monkeypatch.setattr(loop.MeshSteps, "train", step_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    assert main([*CTRL_C_ARGV, "--run_dir", str(run_dir)]) == 130
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back
    output = capsys.readouterr()
    assert f"interrupted at step {stopped + 1}" in output.out, output
    assert "Traceback" not in output.err
    assert [r["step"] for r in records(run_dir)] == list(range(1, stopped + 2))
    assert checkpoint_listing(run_dir)[0] == [stopped, stopped + 1]


def test_killed_during_saves_resumes_from_last_complete_checkpoint(background_runs, ref_run):
    """SIGKILL while asynchronous saves are in flight, then the same run again: it resumes from the
    last complete checkpoint and ends exactly where the uninterrupted reference run ends."""
    run = background_runs["kill"]
    code, stdout, stderr = run.result()
    run_dir = run.stdout.parent / "run"
    assert code == -signal.SIGKILL, (code, stdout, stderr)
    complete, unfinished = checkpoint_listing(run_dir)
    print("at the kill:", run.at_kill, "after:", complete, unfinished)
    assert 3 <= complete[-1] < STEPS
    # One more leftover, at a step the resumed run saves later: it must neither be resumed from nor block that save.
    fake_incomplete_checkpoint(run_dir / "checkpoints", complete[-1] + 5)

    summary = train(run_config(run_dir, *KILL_FLAGS), progress=False)
    assert summary.status == "finished" and summary.step == STEPS
    ref_dir, ref_summary = ref_run
    _, model, optimizer = checkpoint_state(run_dir)
    _, ref_model, ref_optimizer = checkpoint_state(ref_dir)
    assert_trees_equal(model, ref_model, "model")
    assert_trees_equal(optimizer, ref_optimizer, "optimizer")
    assert_same_train_records(records(run_dir), records(ref_dir))
    assert summary.validation == ref_summary.validation


# --- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--source", "/nonexistent/file.txt"], "/nonexistent/file.txt"),
        (["--preset", "huge"], "huge"),
        (["--d_model", "0"], "d_model"),
        (["--kv_target", "2"], "kv_target"),
        (["--no_such_flag", "1"], "no_such_flag"),
        (["--steps", "abc"], "abc"),
        (["--validation_fraction", "0.9"], "validation_fraction"),
        (["--router", "x"], "router"),
        (["--metrics", "jsonl,tensorbored"], "tensorbored"),
        (["--metrics", "tensorboard"], "jsonl"),
        (["--profile_steps", "5:2"], "5:2"),
        (["--log_every", "0"], "log_every"),
    ],
    ids=["missing-source", "unknown-preset", "d_model", "kv_target", "unknown-flag", "non-numeric", "fraction", "router",
         "metric-writer", "no-jsonl", "profile-steps", "log_every"],
)
def test_bad_command_line_exits_2_with_one_line(flags, named, tmp_path, capsys):
    argv = ["train", "--preset", "tiny", "--run_dir", str(tmp_path / "run"), "--quiet", *flags]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert named in lines[0], lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_failed_start_does_not_pin_the_run_folder(tmp_path, capsys):
    """A typo in --source fails before any training; the corrected command must not then be refused
    as "another config" by the config.json the failed start left behind."""
    run_dir = tmp_path / "run"
    assert main(["train", *REF_FLAGS, "--run_dir", str(run_dir), "--source", "/nonexistent/file.txt"]) == 2
    capsys.readouterr()
    prepare_run_folder(run_config(run_dir))  # what `train` does first with the corrected command


def test_console_script_bad_flag(tmp_path):
    for argv in (["train", "--preset", "huge"], ["eval", "--run_dir", str(tmp_path / "nothing")]):
        result = subprocess.run([HAMJAX, *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert ("huge" if argv[0] == "train" else "nothing") in lines[0]
        assert "Traceback" not in result.stderr


def test_per_head_thresholds_train_with_one_trace_and_restore_into_a_fresh_model(tmp_path):
    """tau_per_head, decided when the model is built: the controller moves each head's tau, the
    state keeps its [H] shape, so the jitted step traces once, and a checkpoint saved after the
    updates restores into a freshly built model."""
    tiny = preset("tiny")
    config = dataclasses.replace(tiny.model, n_layers=2, pattern="ham,gdn", tau_per_head=True, tau_lr=1.0)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, TrainConfig(warmup_steps=0))
    assert model.taus().shape == (1, config.heads)
    traces = []

    def counted(state, rows, segment_ids):
        traces.append(1)
        return step_module.state_train_step(nnx.graphdef((model, optimizer)))(state, rows, segment_ids)

    step = jax.jit(counted)
    corpus = load_corpus(tiny)
    state = nnx.state((model, optimizer))
    for i in range(3):
        batch = batch_at(corpus.train, i, 4, 0)
        rows = jnp.asarray(batch.tokens[None])
        state, metrics = step(state, rows, jnp.asarray(batch.segment_ids[None]))
    assert len(traces) == 1
    nnx.update((model, optimizer), state)
    taus = np.asarray(model.taus())
    assert taus.shape == (1, config.heads) and not np.allclose(taus, config.tau_init)
    np.testing.assert_array_equal(metrics.tau, taus)

    checkpoints = Checkpoints(tmp_path / "checkpoints", async_save=False)
    try:
        checkpoints.save(3, model, optimizer, {"step": 3})
        fresh = LanguageModel(config, rngs=nnx.Rngs(1))
        checkpoints.restore(fresh, make_optimizer(fresh, TrainConfig(warmup_steps=0)))
    finally:
        checkpoints.close()
    np.testing.assert_array_equal(fresh.taus(), taus)


def test_the_training_step_moves_tau_by_the_fraction_over_tau_not_the_capped_admissions():
    """With 2 slots per row and head and tau far below every score, admissions are capped near
    2 / T while nearly every token scores above tau: log tau moves by tau_lr * (over_tau - target)."""
    tiny = preset("tiny")
    config = dataclasses.replace(tiny.model, n_layers=1, pattern="ham", capacity=2, tau_init=1e-3, kv_target=0.25)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, TrainConfig(warmup_steps=0))
    batch = batch_at(load_corpus(tiny).train, 0, 4, 0)
    rows, segment_ids = jnp.asarray(batch.tokens), jnp.asarray(batch.segment_ids)
    _, stats = nnx.jit(lambda m, r, s: m(r, segment_ids=s))(model, rows[:, :-1], segment_ids[:, :-1])
    over_tau = float(stats.over_tau[0])
    assert over_tau > 0.9 and float(stats.kv_fraction[0]) < 0.1
    metrics = train_step(model, optimizer, rows[None], segment_ids[None])
    expected = math.log(1e-3) + config.tau_lr * (over_tau - 0.25)
    np.testing.assert_allclose(np.log(metrics.tau), [expected], rtol=1e-5)
