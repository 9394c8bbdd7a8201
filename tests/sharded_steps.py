"""Training steps and checkpoints on several meshes of simulated CPU devices.

Run as a script in a process of its own, because the number of host devices is fixed
when JAX starts: `XLA_FLAGS=--xla_force_host_platform_device_count=8 python
tests/sharded_steps.py MODE OUT_JSON`. MODE "steps" trains the same batches on each mesh
shape; MODE "checkpoint" saves on one mesh and restores on another. The results go to
OUT_JSON for tests/test_sharding.py to check.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from tvq.data.batches import train_batch
from tvq.train.checkpoint import Checkpoints
from tvq.train.config import RunConfig
from tvq.train.sharding import make_mesh
from tvq.train.step import Trainer

jax.config.update("jax_default_matmul_precision", "highest")

# Widths that every model axis size used here (1, 2, 4) divides: 4 heads of 16, a
# vocabulary of 260, a 128-wide shga value.
CONFIG = {
    "n_vocab": 260, "d_model": 64, "d_k": 16, "n_code": 16, "n_layer": 2, "block_len": 8,
    "sequence_len": 32, "dtype": "float32", "remat": "none", "global_batch_size": 8,
    "eval_batch_size": 8, "lr_max": 0.003, "n_warmup_step": 1, "n_max_step": 10,
}
MESH_SHAPES = [(1, 1), (8, 1), (4, 2), (2, 4)]
N_STEPS = 3


def mesh_for(shape):
    """A mesh of the given (data, model) shape over the first data * model devices."""
    data, model = shape
    return make_mesh(data, model, devices=jax.devices()[: data * model])


def tokens():
    return np.random.default_rng(0).integers(3, 260, size=4096).astype(np.uint16)


def run_steps(config, shape):
    trainer = Trainer(config, mesh_for(shape))
    state = trainer.init_state()
    losses = []
    for step in range(N_STEPS):
        batch = train_batch(tokens(), step, seed=0, batch_size=8, sequence_len=32)
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return trainer, state, losses


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def split_leaves(state):
    """Count the parameter arrays that are split over the model axis."""
    return sum(
        "model" in tuple(x.sharding.spec) for x in jax.tree.leaves(state["params"])
    )


def compare_steps(head_type, shapes):
    config = RunConfig.from_dict({**CONFIG, "head_type": head_type})
    _, reference, reference_losses = run_steps(config, (1, 1))
    results = {}
    for shape in shapes:
        _, state, losses = run_steps(config, shape)
        params, expected = flat(state["params"]), flat(reference["params"])
        moments = flat(state["opt_state"]), flat(reference["opt_state"])
        results["x".join(map(str, shape))] = {
            "losses": losses,
            "reference_losses": reference_losses,
            "param_max_abs_diff": float(np.max(np.abs(params - expected))),
            "param_relative_diff": float(
                np.linalg.norm(params - expected) / np.linalg.norm(expected)
            ),
            "moment_relative_diff": float(
                np.linalg.norm(moments[0] - moments[1]) / np.linalg.norm(moments[1])
            ),
            "codebook_relative_diff": float(
                np.linalg.norm(flat(state["codebook"]) - flat(reference["codebook"]))
                / np.linalg.norm(flat(reference["codebook"]))
            ),
            "split_params": split_leaves(state),
            "n_params": len(jax.tree.leaves(state["params"])),
        }
    return results


def save_and_restore(saved_shape, restored_shape, folder):
    config = RunConfig.from_dict({**CONFIG, "head_type": "mha"})
    _, state, _ = run_steps(config, saved_shape)
    checkpoints = Checkpoints(folder)
    checkpoints.save(N_STEPS, state, {"config": config.to_dict()}, val_loss=1.0)
    checkpoints.wait()
    checkpoints.close()

    trainer = Trainer(config, mesh_for(restored_shape))
    reader = Checkpoints(folder, read_only=True)
    restored = reader.restore(N_STEPS, trainer.abstract_state())
    reader.close()
    result = {
        "max_abs_diff": float(np.max(np.abs(flat(restored) - flat(state)))),
        "devices": sorted(
            {len(x.sharding.device_set) for x in jax.tree.leaves(restored["params"])}
        ),
        "split_params": split_leaves(restored),
    }

    # The restored state trains on: one more step on the new mesh (which donates it).
    batch = train_batch(tokens(), N_STEPS, seed=0, batch_size=8, sequence_len=32)
    _, metrics = trainer.train_step(restored, batch)
    result["next_loss_finite"] = bool(np.isfinite(float(metrics["loss"])))
    return result


def main(mode: str, out: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    if mode == "steps":
        # Every mesh for mha; shga, whose value width is split instead of its one head,
        # on the mesh that splits both axes.
        result = {
            "mha": compare_steps("mha", MESH_SHAPES[1:]),
            "shga": compare_steps("shga", [(4, 2)]),
        }
    else:
        with tempfile.TemporaryDirectory() as folder:
            result = {
                "4x2_to_1x1": save_and_restore((4, 2), (1, 1), Path(folder) / "a"),
                "1x1_to_4x2": save_and_restore((1, 1), (4, 2), Path(folder) / "b"),
            }
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
