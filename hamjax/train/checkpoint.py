"""Orbax checkpoints of a run: model (parameters and threshold-controller state), optimizer, and a
JSON record (step, data position, seed, metrics). Saves are atomic: a save interrupted by a crash
leaves no step behind, so a restart resumes from the last complete checkpoint."""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx


def _pure_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    return {"model": nnx.to_pure_dict(nnx.state(model)), "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}


class Checkpoints:
    """The checkpoints/ folder of a run: save every step it is asked to, keep the last `keep`."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.directory = pathlib.Path(directory).absolute()
        handlers = {"state": ocp.StandardCheckpointHandler(), "record": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The last complete checkpoint's step (None: none yet)."""
        return self.manager.latest_step()

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, record: dict) -> None:
        """Start saving (returns once the arrays are copied; the write finishes in the background
        when async)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_pure_state(model, optimizer)), record=ocp.args.JsonSave(record)
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer, step: int | None = None) -> dict:
        """Load checkpoint `step` (default: the latest) into model and optimizer; returns its record."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _pure_state(model, optimizer))
        self._check_dtypes(step, abstract)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except ValueError as error:
            reason = str(error).splitlines()[0][:300]
            raise ValueError(
                f"checkpoint {step} in {self.directory} does not fit this model and optimizer (was it saved "
                f"with another config?): {reason}"
            ) from error
        for obj, name in ((model, "model"), (optimizer, "optimizer")):
            state = nnx.state(obj)
            nnx.replace_by_pure_dict(state, restored["state"][name])
            nnx.update(obj, state)
        return dict(restored["record"])

    def _check_dtypes(self, step: int, abstract: dict) -> None:
        """ValueError naming the first array that checkpoint `step` holds in another dtype than the
        model and optimizer it is restored into (Orbax would cast it silently: a run saved under one
        dtype policy resumes only under the same one)."""
        stored = self.manager.item_metadata(step)["state"]
        held = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(stored)}
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
            saved = held.get(jax.tree_util.keystr(path))
            if saved is not None and saved != leaf.dtype:
                raise ValueError(
                    f"checkpoint {step} in {self.directory} holds {jax.tree_util.keystr(path)} as {saved}, but "
                    f"this model has it as {leaf.dtype}: build the model with the dtypes the run was saved with "
                    "(its config.json's param_dtype)"
                )

    def wait(self) -> None:
        """Block until background saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
