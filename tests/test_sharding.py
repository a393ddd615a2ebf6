"""hamjax.train.sharding and the sharded loop, on 8 simulated CPU devices: a few training steps with
data parallel, with FSDP, and with data x FSDP x tensor over two processes (jax.distributed) equal
one device; the arrays really are split; a checkpoint moves between meshes of different sizes; the
mesh errors name the value."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from hamjax.data import load_documents
from hamjax.train import preset
from hamjax.train.config import config_to_dict
from hamjax.train.loop import load_model, train
from hamjax.train.run_folder import read_metrics
from hamjax.train.sharding import _names, make_mesh, parameter_spec

WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")
STEPS = 4
MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1)}  # in one process of 8 devices
TWO_PROCESS_MESH = (2, 2, 2)  # data x fsdp x tensor over two processes of 4 devices


def run_worker(devices: int, jobs: list, env: dict | None = None, timeout: int = 600) -> dict:
    spec = json.dumps({"devices": devices, "jobs": jobs})
    done = subprocess.run([sys.executable, str(WORKER), spec], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def with_mesh(config, run_dir, mesh):
    train_config = dataclasses.replace(config.train, mesh_data=mesh[0], mesh_fsdp=mesh[1], mesh_tensor=mesh[2])
    return dataclasses.replace(config, train=train_config, run_dir=str(run_dir))


def truncate_to(run_dir: pathlib.Path, copy: pathlib.Path, step: int) -> pathlib.Path:
    """A copy of a run folder with only its checkpoints up to `step` (a run interrupted there)."""
    shutil.copytree(run_dir, copy)
    for checkpoint in (copy / "checkpoints").iterdir():
        if checkpoint.name.isdigit() and int(checkpoint.name) > step:
            shutil.rmtree(checkpoint)
    return copy


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def run_two_processes(jobs: list) -> list[dict]:
    """The jobs in two processes of 4 devices each, started from the environment the way a
    multi-GPU host starts them (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)."""
    spec, port = json.dumps({"devices": 4, "jobs": jobs}), free_port()
    processes = []
    for rank in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(rank))
        processes.append(subprocess.Popen([sys.executable, str(WORKER), spec], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4-step run on one device (in this process), on 8 devices in two meshes (one worker
    process) and on 2 x 4 devices (two worker processes), plus resumes across meshes."""
    root = tmp_path_factory.mktemp("sharding")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(load_documents("kjv")["text"][:10]):  # 207 training and 23 validation rows
        (corpus / f"{i:02d}.txt").write_text(text[:1500])
    tiny = preset("tiny")
    config = dataclasses.replace(
        tiny,
        model=dataclasses.replace(tiny.model, pattern="ham,attention"),
        data=dataclasses.replace(tiny.data, source=str(corpus), validation_fraction=0.1),
        train=dataclasses.replace(tiny.train, steps=STEPS, batch_size=8, eval_every=STEPS, eval_batches=0, save_every=2,
                                  async_checkpoints=False),
    )
    one = with_mesh(config, root / "one", (0, 1, 1))
    train(one, progress=False)
    jobs = [{"kind": "train", "config": config_to_dict(with_mesh(config, root / name, mesh))}
            for name, mesh in MESHES.items()]
    # One device's checkpoint at step 2, resumed on 8 devices (FSDP).
    resumed_on_8 = with_mesh(config, truncate_to(root / "one", root / "one_then_8", 2), MESHES["fsdp"])
    jobs.append({"kind": "train", "config": config_to_dict(resumed_on_8)})
    # The layouts after one step, in the training jobs' configs (their compiled steps are reused).
    jobs += [{"kind": "layout", "config": jobs[i]["config"]} for i in range(len(MESHES))]
    jobs.append({"kind": "errors", "config": config_to_dict(config)})
    worker = run_worker(8, jobs)
    two = with_mesh(config, root / "two_processes", TWO_PROCESS_MESH)
    two_processes = run_two_processes([{"kind": "train", "config": config_to_dict(two)},
                                       {"kind": "layout", "config": config_to_dict(two)}])
    # The 8-device FSDP checkpoint at step 2, resumed here on one device.
    resumed_on_1 = with_mesh(config, truncate_to(root / "fsdp", root / "eight_then_1", 2), (0, 1, 1))
    train(resumed_on_1, progress=False)
    return root, config, worker, two_processes


def assert_same_run(reference: pathlib.Path, other: pathlib.Path):
    """Same losses, KV fractions and thresholds at every step, same final parameters and optimizer
    state (restored here onto one device), within float32 rounding of reordered sums."""
    ref, got = read_metrics(reference / "metrics.jsonl"), read_metrics(other / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in ref] == [(r["kind"], r["step"]) for r in got]
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-6)
        np.testing.assert_allclose(b["kv_fraction"], a["kv_fraction"], rtol=1e-6)
        if a["kind"] == "train":
            np.testing.assert_allclose(b["tau"], a["tau"], rtol=1e-6)
            np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
    (model_a, _, step_a), (model_b, _, step_b) = load_model(str(reference)), load_model(str(other))
    assert step_a == step_b == STEPS
    for x, y in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_training_equals_one_device(runs, mesh):
    root, _, worker, _ = runs
    assert worker["devices"] == 8
    assert_same_run(root / "one", root / mesh)


def test_two_processes_equal_one_device(runs):
    """data x fsdp x tensor = 2 x 2 x 2 over two processes, each loading only its own rows."""
    root, _, _, reports = runs
    assert sorted(r["process"] for r in reports) == [0, 1] and all(r["devices"] == 8 for r in reports)
    assert_same_run(root / "one", root / "two_processes")


def test_checkpoint_moves_from_one_device_to_eight(runs):
    root = runs[0]
    assert_same_run(root / "one", root / "one_then_8")


def test_checkpoint_moves_from_eight_devices_to_one(runs):
    root = runs[0]
    assert_same_run(root / "one", root / "eight_then_1")


@pytest.mark.parametrize("mesh", [*MESHES, "two_processes"])
def test_parameters_and_optimizer_state_are_split(runs, mesh):
    """After a step, every array has the layout its rule names, and the per-device pieces have the
    shapes that layout implies (the optimizer's moments follow their parameters)."""
    _, config, worker, two_processes = runs
    if mesh == "two_processes":
        sizes, report = TWO_PROCESS_MESH, two_processes[0]["results"][1]
    else:
        sizes, report = MESHES[mesh], worker["results"][len(MESHES) + 1 + list(MESHES).index(mesh)]
    arrays = report["arrays"]
    sizes = dict(zip(("data", "fsdp", "tensor"), sizes))
    for name, array in arrays.items():
        spec = parameter_spec(tuple(name.split("/")), len(array["shape"]))
        assert array["spec"] == str(spec), name
        expected = [n // sizes[axis] if axis else n for n, axis in zip(array["shape"], tuple(spec) + (None,) * 9)]
        assert array["shard"] == expected, name
    d, hidden = config.model.d_model, config.model.mlp_width
    split = {name: array["shard"] for name, array in arrays.items()}
    gate = "0/blocks/0/mlp/gate_proj/kernel"
    assert split[gate] == [d // sizes["fsdp"], hidden // sizes["tensor"]]
    assert split["1/opt_state/1/mu/blocks/0/mlp/gate_proj/kernel"] == split[gate]
    assert split["0/embed/embedding"] == [config.model.vocab_size // sizes["tensor"], d // sizes["fsdp"]]
    assert split["0/blocks/1/mixer/q_proj/kernel"][1] == config.model.heads * config.model.key_dim // sizes["tensor"]


@pytest.mark.parametrize("mesh", [*MESHES, "two_processes"])
def test_each_process_holds_the_rows_of_its_own_pieces(runs, mesh):
    """Every local piece of a batch holds the rows the step's index names there; a process holds
    one piece per batch shard on its devices (4 of 8 over two processes of data x fsdp = 2 x 2)."""
    _, _, worker, two_processes = runs
    if mesh == "two_processes":
        reports = [report["results"][1] for report in two_processes]
        assert [r["batch_pieces"] for r in reports] == [2, 2]
    else:
        reports = [worker["results"][len(MESHES) + 1 + list(MESHES).index(mesh)]]
        assert reports[0]["batch_pieces"] == 8
    assert all(r["batch"] for r in reports)


def test_two_processes_read_disjoint_rows_whose_union_is_the_batch(runs):
    """Each process reads from the corpus rows (a memory map in training) only the rows of its own
    devices' pieces: half the batch each, none read by both."""
    reports = [report["results"][1] for report in runs[3]]
    (index,) = {tuple(r["index"]) for r in reports}
    first, second = (set(r["rows_read"]) for r in reports)
    assert len(first) == len(second) == len(index) // 2
    assert not first & second and first | second == set(index)
    (single,) = [runs[2]["results"][len(MESHES) + 1]]  # one process of 8 devices reads the whole batch
    assert set(single["rows_read"]) == set(single["index"])


def test_mesh_errors_name_the_value(runs):
    messages = runs[2]["results"][-1]
    assert messages["batch"] == (
        "batch_size 6 is not divisible by the mesh's data x fsdp = 4 x 2 = 8 batch shards"
    )
    assert "dimension 0 (36) is not divisible by the mesh axis 'fsdp' of size 8" in messages["parameter"]
    assert messages["parameter"].startswith("parameter 0/")
    assert "3 x 2 x 1 = 6 devices, but there are 8" in messages["mesh"]


def test_one_device_is_the_degenerate_mesh():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


def test_parameter_rules_by_name():
    assert parameter_spec(("blocks", "3", "mlp", "down_proj", "kernel"), 2) == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert parameter_spec(("blocks", "0", "mixer", "proj", "out_proj", "kernel"), 2) == jax.sharding.PartitionSpec(None, "fsdp")
    assert parameter_spec(("blocks", "0", "mixer", "out_proj", "kernel"), 2) == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert parameter_spec(("blocks", "0", "mixer", "proj", "A_log"), 1) == jax.sharding.PartitionSpec()
    assert parameter_spec(("blocks", "0", "mixer", "proj", "conv", "weight"), 2) == jax.sharding.PartitionSpec()
    assert _names((jax.tree_util.DictKey("a"), jax.tree_util.SequenceKey(2), jax.tree_util.GetAttrKey("value"))) == ("a", "2")
