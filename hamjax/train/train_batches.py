"""The training batches of a run as global arrays on the mesh, step by step: from a prepared corpus
(rows by index, a pure function of seed and step) or from a stream (each process's next rows, with
the stream's state saved beside every checkpoint so that a resumed run reads on exactly where it
stopped)."""

from __future__ import annotations

import json
import pathlib
import threading

import jax
import numpy as np
from jax.sharding import Mesh

from hamjax.data import Corpus, RowStream, batch_indices, load_tokenizer, stream_documents
from hamjax.train.config import RunConfig
from hamjax.train.sharding import batch_on_mesh, batch_sharding


class PreparedBatches:
    """Step s's rows are corpus.train's rows at batch_indices(N, s - 1, grad_accum x batch_size, seed)."""

    def __init__(self, config: RunConfig, corpus: Corpus, mesh: Mesh):
        self.rows, self.mesh, self.train = corpus.train, mesh, config.train

    def __call__(self, step: int):
        """-> rows, segment_ids [grad_accum, batch_size, seq_len + 1] global arrays."""
        tc = self.train
        index = batch_indices(len(self.rows.tokens), step - 1, tc.batch_size * tc.grad_accum, tc.seed)
        return batch_on_mesh(*self.rows, index.reshape(tc.grad_accum, tc.batch_size), self.mesh)

    def saved(self, step: int) -> None:
        """Nothing to keep: the batch order is a function of the step."""


class StreamedBatches:
    """Each step's rows come from this process's RowStream: the rows of its own devices' pieces of
    the batch. The stream's state after each step's batch is kept until that step is saved (the
    batches may be built ahead of the training), then written to run/stream/ (one file per step
    and process); resuming at a step reads its file."""

    def __init__(self, config: RunConfig, mesh: Mesh, run: pathlib.Path, start: int):
        tc, d = config.train, config.data
        self.folder, self.states, self.lock = run / "stream", {}, threading.Lock()
        self.keep = tc.keep_checkpoints
        self.sharding = batch_sharding(mesh, 3)
        self.shape = (tc.grad_accum, tc.batch_size, d.seq_len + 1)
        self.local_rows = _local_batch_rows(self.sharding, self.shape)
        self.stream = RowStream(
            stream_documents(d.source, d.text_field), load_tokenizer(d.tokenizer), d.seq_len + 1, split="train",
            validation_fraction=d.validation_fraction, rank=jax.process_index(), processes=jax.process_count(),
            state=self._load(start) if start else None,
        )

    def __call__(self, step: int):
        rows = self.stream.next_rows(self.shape[0] * self.local_rows)
        with self.lock:  # the batches may be built in another thread
            self.states[step] = self.stream.state()
        local = [part.reshape(self.shape[0], self.local_rows, -1) for part in rows]
        return tuple(jax.make_array_from_process_local_data(self.sharding, x, self.shape) for x in local)

    def saved(self, step: int) -> None:
        """Write the stream's state after step's batch (keeping the last keep_checkpoints files);
        forget the states of earlier steps."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.lock:
            state = self.states[step]
            for earlier in [s for s in self.states if s <= step]:
                del self.states[earlier]
        self._path(step).write_text(json.dumps(state))
        for old in sorted(self.folder.glob(f"step_*.process_{jax.process_index()}.json"))[:-self.keep]:
            old.unlink()  # as Orbax keeps only the last keep_checkpoints checkpoints

    def _path(self, step: int) -> pathlib.Path:
        return self.folder / f"step_{step:08d}.process_{jax.process_index()}.json"

    def _load(self, step: int) -> dict:
        path = self._path(step)
        if not path.exists():
            raise FileNotFoundError(f"the stream's position at checkpoint {step} is missing ({path}): this run "
                                    "cannot resume its stream exactly")
        return json.loads(path.read_text())


def _local_batch_rows(sharding, shape) -> int:
    """How many of the batch's rows this process's devices hold. ValueError when two processes
    hold the same rows (a stream gives every process other rows)."""
    holders = {}
    for device, index in sharding.devices_indices_map(shape).items():
        holders.setdefault(index[1].indices(shape[1]), set()).add(device.process_index)
    shared = [rows for rows, processes in holders.items() if len(processes) > 1]
    if shared:
        raise ValueError(f"with streaming, each process must hold its own rows of the batch, but rows {shared[0][:2]} "
                         "are on devices of several processes: put the processes along the mesh's data or fsdp axis")
    mine = [rows for rows, processes in holders.items() if jax.process_index() in processes]
    return int(sum(np.arange(*rows).size for rows in mine))


def training_batches(config: RunConfig, corpus: Corpus, mesh: Mesh, run: pathlib.Path, start: int):
    """The run's batch maker: step -> (rows, segment_ids); its saved(step) keeps what resuming needs."""
    if config.data.streaming:
        return StreamedBatches(config, mesh, run, start)
    return PreparedBatches(config, corpus, mesh)
