"""A process with its own simulated CPU devices, for tests/test_sharding.py (XLA's device count is
fixed when JAX starts, so each mesh size needs a process of its own).

    python tests/sharding_worker.py '{"devices": 8, "jobs": [...]}'   # prints one JSON line

Jobs: {"kind": "train", "config": <config_to_dict>} trains (or resumes) a run with hamjax.train.train;
{"kind": "layout", "config": ...} places a model and optimizer on the config's mesh, takes one step
and reports every array's global and per-device shapes after it;
{"kind": "errors", "config": ...} reports the messages of a batch and a parameter the mesh cannot split.
With JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, it is one process of a
multi-process run.
"""

import json
import os
import sys

spec = json.loads(sys.argv[1])
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={spec['devices']}"

from hamjax.train import distributed  # noqa: E402  (after XLA_FLAGS)

distributed.initialize_if_requested()

import dataclasses  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from hamjax.train import sharding  # noqa: E402
from hamjax.train.config import config_from_dict  # noqa: E402
from hamjax.train.loop import build, train  # noqa: E402
from hamjax.train.step import MeshSteps  # noqa: E402


class RowsRead:
    """Corpus rows [N, L] (as a memory map is read: by row number) that record the rows asked for."""

    def __init__(self, rows):
        self.rows, self.shape, self.read = rows, rows.shape, set()

    def __getitem__(self, index):
        self.read.update(np.asarray(index).ravel().tolist())
        return self.rows[index]


def layout(config):
    """One step on a batch of 3 x batch_size random rows -> {"arrays": every array's global shape,
    first local shard's shape and spec, "batch": whether each local piece of the batch holds the
    rows its index names, "batch_pieces": how many distinct pieces this process holds, "index":
    the batch's row numbers, "rows_read": the corpus rows this process read}."""
    mesh = sharding.make_mesh(config.train.mesh_data, config.train.mesh_fsdp, config.train.mesh_tensor)
    model, optimizer = build(config)
    steps = MeshSteps(model, optimizer, mesh)
    rng = np.random.default_rng(0)
    batch_size, length = config.train.batch_size, config.data.seq_len + 1
    tokens = rng.integers(0, config.model.vocab_size, (3 * batch_size, length)).astype(np.int32)
    index = rng.permutation(3 * batch_size)[:batch_size].reshape(1, batch_size)
    corpus_rows = RowsRead(tokens)
    rows, segment_ids = sharding.batch_on_mesh(corpus_rows, np.ones_like(tokens), index, mesh)
    expected = tokens[index]
    pieces = {str(shard.index): np.array_equal(np.asarray(shard.data), expected[shard.index])
              for shard in rows.addressable_shards}
    steps.train(rows, segment_ids)
    arrays = {}
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.state((model, optimizer)))[0]:
        arrays["/".join(sharding._names(path))] = {
            "shape": list(x.shape), "shard": list(x.addressable_shards[0].data.shape), "spec": str(x.sharding.spec)
        }
    return {"arrays": arrays, "batch": all(pieces.values()), "batch_pieces": len(pieces),
            "index": index.ravel().tolist(), "rows_read": sorted(corpus_rows.read)}


def errors(config):
    messages = {}
    try:
        sharding.check_batch_size(6, sharding.make_mesh(4, 2, 1))
    except ValueError as error:
        messages["batch"] = str(error)
    wide = dataclasses.replace(config.model, d_model=36)
    model, optimizer = build(dataclasses.replace(config, model=wide))
    try:
        sharding.state_shardings(nnx.state((model, optimizer)), sharding.make_mesh(1, 8, 1))
    except ValueError as error:
        messages["parameter"] = str(error)
    try:
        sharding.make_mesh(3, 2, 1)
    except ValueError as error:
        messages["mesh"] = str(error)
    return messages


results = []
for job in spec["jobs"]:
    config = config_from_dict(job["config"])
    if job["kind"] == "train":
        summary = train(config, progress=False)
        results.append({"step": summary.step, "loss": summary.validation.loss})
    elif job["kind"] == "layout":
        results.append(layout(config))
    else:
        results.append(errors(config))
print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "results": results}))
