"""The device mesh and where every array of a training run lives on it.

Mesh axes: "data" (data parallel: parameters replicated, batch split), "fsdp" (fully sharded data
parallel: batch split and parameters, gradients and optimizer state split along the model width D),
"tensor" (tensor parallel: the MLP hidden units, attention heads and the vocabulary split).
One device is the mesh (1, 1, 1) and runs the same code.

Parameter rules (by the parameter's name; the optimizer's moments follow their parameter):

    embed/embedding [vocab, D]        ("tensor", "fsdp")
    head/kernel [D, vocab]            ("fsdp", "tensor")
    mlp/{gate,up}_proj [D, F]         ("fsdp", "tensor")      mlp/down_proj [F, D]   ("tensor", "fsdp")
    attention {q,k,v}_proj [D, HK]    ("fsdp", "tensor")      attention out_proj [HK, D]  ("tensor", "fsdp")
    GDN/HAM qkv_proj, gate_proj [D, *]  ("fsdp", None)        GDN/HAM out_proj [HV, D]  (None, "fsdp")
    HAM router_mlp hidden [D, *]      ("fsdp", None)
    everything else (norm scales, gates' per-head vectors, conv weights, tau, counts): replicated

The delta-rule mixers' fused projections (columns q | k | v and z | b | a) are not split over
"tensor": the slices would not follow the heads, so every step would gather them back.
"""

from __future__ import annotations

import math
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the axes that split the batch

# (the parameter's last names, its spec): the first rule whose names end the parameter's path wins.
PARAMETER_RULES = (
    (("embed", "embedding"), P("tensor", "fsdp")),
    (("head", "kernel"), P("fsdp", "tensor")),
    (("mlp", "gate_proj", "kernel"), P("fsdp", "tensor")),
    (("mlp", "up_proj", "kernel"), P("fsdp", "tensor")),
    (("mlp", "down_proj", "kernel"), P("tensor", "fsdp")),
    (("proj", "qkv_proj", "kernel"), P("fsdp", None)),
    (("proj", "gate_proj", "kernel"), P("fsdp", None)),
    (("proj", "out_proj", "kernel"), P(None, "fsdp")),
    (("router_mlp", "hidden", "kernel"), P("fsdp", None)),
    (("mixer", "q_proj", "kernel"), P("fsdp", "tensor")),
    (("mixer", "k_proj", "kernel"), P("fsdp", "tensor")),
    (("mixer", "v_proj", "kernel"), P("fsdp", "tensor")),
    (("mixer", "out_proj", "kernel"), P("tensor", "fsdp")),
)


def make_mesh(data: int = 0, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh over `devices` (default: all of them, on every process) with axes AXES of the given
    sizes; data = 0 takes the devices the other two leave. ValueError when the sizes do not multiply
    to the device count."""
    devices = jax.devices() if devices is None else list(devices)
    for name, size in (("fsdp", fsdp), ("tensor", tensor)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh size {name} must be a positive integer, got {size!r}")
    if isinstance(data, bool) or not isinstance(data, int) or data < 0:
        raise ValueError(f"mesh size data must be a non-negative integer (0: the rest), got {data!r}")
    if data == 0:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"fsdp x tensor = {fsdp} x {tensor} does not divide the {len(devices)} devices")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(
            f"mesh data x fsdp x tensor = {data} x {fsdp} x {tensor} = {data * fsdp * tensor} devices, "
            f"but there are {len(devices)}"
        )
    # Auto axes: the compiler propagates the shardings of the state and batches through the model.
    return jax.make_mesh((data, fsdp, tensor), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _names(path) -> tuple[str, ...]:
    """A tree path -> its keys as strings, without Variable's trailing `.value`."""
    names = [str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))) for key in path]
    return tuple(names[:-1] if names and names[-1] == "value" else names)


def parameter_spec(names: tuple[str, ...], ndim: int) -> P:
    """The PartitionSpec of an array named by its path (see the module docstring)."""
    for suffix, spec in PARAMETER_RULES:
        if names[-len(suffix):] == suffix and ndim == len(spec):
            return spec
    return P()


def _axis_size(mesh: Mesh, axes) -> int:
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes if a is not None)


def state_shardings(state, mesh: Mesh):
    """A pytree of arrays (model and optimizer state) -> the same tree of NamedShardings.
    ValueError naming the parameter when a mesh axis does not divide the dimension it splits."""

    def sharding(path, x):
        names = _names(path)
        spec = parameter_spec(names, np.ndim(x))
        for dim, axes in enumerate(spec):
            size = _axis_size(mesh, axes)
            if axes is not None and np.shape(x)[dim] % size:
                raise ValueError(
                    f"parameter {'/'.join(names)} of shape {tuple(np.shape(x))}: dimension {dim} "
                    f"({np.shape(x)[dim]}) is not divisible by the mesh axis {axes!r} of size {size}"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(sharding, state)


def place(tree, shardings):
    """Host-identical arrays (every process holds the same values) -> global arrays laid out as
    `shardings`; each process copies only the shards its devices hold."""

    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows [B, L] (ndim 2) or micro-batches of rows [A, B, L] (ndim 3): B split over BATCH_AXES."""
    return NamedSharding(mesh, P(*(None,) * (ndim - 2), BATCH_AXES, None))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the mesh splits a batch's rows into."""
    return _axis_size(mesh, BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """ValueError unless the mesh's batch axes divide the per-step batch."""
    shards = batch_shards(mesh)
    if batch_size % shards:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the mesh's data x fsdp = "
            f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {shards} batch shards"
        )


def global_rows(array: np.ndarray, index: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The corpus rows `array` [N, L] at row numbers `index` ([B] or [A, B]) -> a global array
    [*index.shape, L] laid out as `sharding`. Every process knows the whole index; each gathers
    only the rows its devices hold."""
    shape = (*index.shape, array.shape[1])
    return jax.make_array_from_callback(shape, sharding, lambda at: array[index[at[:-1]]][..., at[-1]])


def batch_on_mesh(tokens: np.ndarray, segment_ids: np.ndarray, index: np.ndarray, mesh: Mesh):
    """Packed rows (tokens, segment_ids [N, L]) at row numbers `index` ([B] or [A, B]) -> the two
    global arrays [*index.shape, L]: rows split over the batch axes, or replicated when B is not a
    multiple of the batch shards (an evaluation's last batch)."""
    split = index.shape[-1] % batch_shards(mesh) == 0
    layout = batch_sharding(mesh, index.ndim + 1) if split else NamedSharding(mesh, P())
    return global_rows(tokens, index, layout), global_rows(segment_ids, index, layout)
