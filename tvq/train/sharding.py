"""The device mesh, and where each array of the training state and each batch lives.

The mesh has two axes. `data` splits every batch by sequences. `model` splits the
parameters that have a head, value, hidden or vocabulary axis large enough to divide,
Megatron-style. The choice is made per parameter from its name, so the same rules
place the AdamW or Lion moments of a parameter like the parameter itself. A
parameter without a divisible axis, and any state of another shape (Adafactor's
factored moments, counters), is replicated. XLA inserts the collectives that each
placement needs, so every placement computes the same function.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tvq.model.config import ConfigError

MESH_AXES = ("data", "model")

# Per (module, parameter) name: the rank of the parameter in one layer, and the axes that
# may go on `model`, in order of preference. Rank-matched so that only parameters and
# the optimiser moments shaped like them are split.
MODEL_AXIS_RULES: dict[tuple[str, str], tuple[int, tuple[int, ...]]] = {
    ("embed", "embedding"): (2, (0,)),  # [N, D]: vocabulary
    ("unembed", "kernel"): (2, (1,)),  # [D, N]: vocabulary
    ("q_proj", "kernel"): (4, (1, 2)),  # [D, h, G, K]: key/value heads, then query heads
    ("k_proj", "kernel"): (3, (1,)),  # [D, h, K]
    ("r_proj", "kernel"): (3, (1,)),  # [D, h, K]
    ("v_proj", "kernel"): (3, (1, 2)),  # [D, h, V]: heads, then value width
    ("g_proj", "kernel"): (2, (1,)),  # [D, V]
    ("o_proj", "kernel"): (4, (0, 1, 2)),  # [h, G, V, D]
    ("attn", "u"): (3, (0, 1)),  # [h, G, K]
    ("attn", "w"): (3, (0, 1)),
    ("attn_0", "u"): (3, (0, 1)),
    ("attn_0", "w"): (3, (0, 1)),
    ("attn_1", "u"): (3, (0, 1)),
    ("attn_1", "w"): (3, (0, 1)),
    ("fc_in", "kernel"): (2, (1,)),  # [D, F]: hidden width
    ("fc_out", "kernel"): (2, (0,)),  # [F, D]
    ("quantizer", "code_sums"): (3, (0,)),  # [h, S, K]: one codebook per head
    ("quantizer", "code_counts"): (2, (0,)),  # [h, S]
}
# Parameters under this name are stacked over layers, with the layer axis first.
LAYER_STACK = "layers"


def resolve_mesh_shape(mesh_data: int, mesh_model: int, n_device: int) -> tuple[int, int]:
    """Return (data, model) sizes whose product is n_device; -1 takes what is left."""
    sizes = {"mesh_data": mesh_data, "mesh_model": mesh_model}
    if mesh_data == -1 and mesh_model == -1:
        raise ConfigError("mesh_data and mesh_model are both -1; give one of them a size")
    for key, size in sizes.items():
        if size != -1 and size <= 0:
            raise ConfigError(f"{key} must be a positive integer or -1, got {size}")
    known = None
    if mesh_data == -1:
        known = mesh_model
    elif mesh_model == -1:
        known = mesh_data
    if known is not None:
        if n_device % known:
            key = "mesh_model" if mesh_data == -1 else "mesh_data"
            raise ConfigError(
                f"{key} {known} does not divide the {n_device} devices; set it to a divisor "
                f"of {n_device}, such as --set {key}=1"
            )
        rest = n_device // known
        return (rest, known) if mesh_data == -1 else (known, rest)
    if mesh_data * mesh_model != n_device:
        raise ConfigError(
            f"mesh_data {mesh_data} x mesh_model {mesh_model} is {mesh_data * mesh_model} "
            f"devices, but there are {n_device}; set one of them to -1"
        )
    return mesh_data, mesh_model


def make_mesh(mesh_data: int = -1, mesh_model: int = 1, devices=None) -> Mesh:
    """Return a (data, model) mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(mesh_data, mesh_model, len(devices))
    # Auto axes let XLA propagate shardings through the model from the inputs' shardings.
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def _names(path) -> tuple[str, ...]:
    """Return the dict keys and attribute names along a pytree path, as strings."""
    names = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            names.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            names.append(entry.name)
    return tuple(names)


def partition_spec(
    names: tuple[str, ...], shape: tuple[int, ...], model_size: int
) -> PartitionSpec:
    """Return where an array of the state, named by its path, goes on the mesh."""
    if model_size == 1 or len(names) < 2:
        return PartitionSpec()
    rule = MODEL_AXIS_RULES.get((names[-2], names[-1]))
    if rule is None:
        return PartitionSpec()
    rank, candidates = rule
    offset = 1 if LAYER_STACK in names else 0
    if len(shape) != rank + offset:
        return PartitionSpec()
    for axis in candidates:
        if shape[axis + offset] % model_size == 0:
            spec = [None] * len(shape)
            spec[axis + offset] = "model"
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Return a NamedSharding for every array of a (possibly abstract) state tree."""
    model_size = mesh.shape["model"]

    def place(path, leaf):
        spec = partition_spec(_names(path), tuple(np.shape(leaf)), model_size)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(place, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the batch dimension over the data axis."""
    return NamedSharding(mesh, PartitionSpec("data"))


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """Return the rows of a batch that this process's devices hold: one contiguous range.

    Each process loads only these rows, and `jax.make_array_from_process_local_data`
    assembles the global batch from every process's part.
    """
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows = index[0]
        starts.append(rows.start or 0)
        stops.append(global_shape[0] if rows.stop is None else rows.stop)
    start, stop = min(starts), max(stops)
    covered = np.zeros(global_shape[0], bool)
    for begin, end in zip(starts, stops, strict=True):
        covered[begin:end] = True
    if not covered[start:stop].all():
        raise ValueError(
            f"the devices of process {jax.process_index()} hold rows that are not "
            "contiguous; order the mesh's devices by process"
        )
    return slice(start, stop)
