"""Sharding: mesh shapes, placement rules, and training on meshes of 8 simulated devices.

The multi-device checks run tests/sharded_steps.py in a child process started with 8
host devices, because a process fixes its device count when JAX starts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec

from tvq.model.config import ConfigError
from tvq.train.config import RunConfig
from tvq.train.sharding import partition_spec, resolve_mesh_shape

SCRIPT = Path(__file__).with_name("sharded_steps.py")
# AdamW's first steps move each parameter by about lr_max whatever its gradient's size,
# so an entry whose gradient is rounding noise around 0 can differ by up to that much.
LR_MAX = 0.003


@pytest.mark.parametrize(
    "data, model, expected",
    [(-1, 1, (8, 1)), (4, -1, (4, 2)), (-1, 4, (2, 4)), (2, 4, (2, 4)), (8, 1, (8, 1))],
)
def test_mesh_shape_resolves(data, model, expected):
    assert resolve_mesh_shape(data, model, 8) == expected


@pytest.mark.parametrize(
    "data, model, message",
    [
        (3, -1, "mesh_data 3 does not divide the 8 devices"),
        (-1, 3, "mesh_model 3 does not divide the 8 devices"),
        (2, 2, "mesh_data 2 x mesh_model 2 is 4 devices, but there are 8"),
        (-1, -1, "both -1"),
        (0, -1, "mesh_data must be a positive integer or -1"),
    ],
)
def test_impossible_mesh_is_rejected(data, model, message):
    with pytest.raises(ConfigError, match=message):
        resolve_mesh_shape(data, model, 8)


def test_mesh_keys_are_validated_in_config():
    with pytest.raises(ConfigError, match="mesh_model must be a positive integer or -1"):
        RunConfig.from_dict({"mesh_model": 0})
    with pytest.raises(ConfigError, match="both -1"):
        RunConfig.from_dict({"mesh_data": -1, "mesh_model": -1})


def layer_spec(sublayer, module, shape, model_size):
    """The placement of a kernel stacked over layers."""
    return partition_spec(("params", "layers", sublayer, module, "kernel"), shape, model_size)


def test_heads_go_on_the_model_axis():
    # mha: 4 key/value heads; the kernel is stacked over 2 layers.
    mha_q = layer_spec("attn", "q_proj", (2, 64, 4, 1, 16), 2)
    assert mha_q == PartitionSpec(None, None, "model", None, None)
    # mqa: one key/value head, so the 4 query heads are split.
    mqa_q = layer_spec("attn", "q_proj", (2, 64, 1, 4, 16), 4)
    assert mqa_q == PartitionSpec(None, None, None, "model", None)
    # shga: one head; its 128-wide values are split instead.
    shga_v = layer_spec("attn_0", "v_proj", (2, 64, 1, 128), 4)
    assert shga_v == PartitionSpec(None, None, None, "model")
    shga_o = layer_spec("attn_0", "o_proj", (2, 1, 1, 128, 64), 4)
    assert shga_o == PartitionSpec(None, None, None, "model", None)


def test_other_arrays_are_replicated():
    # Nothing divides: 3 heads on a model axis of 2.
    assert layer_spec("attn", "k_proj", (2, 64, 3, 16), 2) == PartitionSpec()
    # A factored second moment has another rank than its parameter.
    factored = partition_spec(("v_row", "layers", "mlp", "fc_in", "kernel"), (2, 64), 2)
    assert factored == PartitionSpec()
    assert partition_spec(("count",), (), 2) == PartitionSpec()
    # With a model axis of 1 everything is replicated.
    assert partition_spec(("params", "embed", "embedding"), (260, 64), 1) == PartitionSpec()


def test_optimizer_moments_follow_their_parameters():
    names = ("opt_state", "mu", "layers", "mlp", "fc_in", "kernel")
    assert partition_spec(names, (2, 64, 256), 4) == PartitionSpec(None, None, "model")
    names = ("codebook", "layers", "attn", "quantizer", "code_sums")
    assert partition_spec(names, (2, 4, 16, 16), 2) == PartitionSpec(None, "model", None, None)


def run_on_8_devices(mode: str, out: Path) -> dict:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(SCRIPT.parents[1]),
    }
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(out)], capture_output=True, text=True,
        env=env, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_meshes_train_like_one_device(tmp_path):
    results = run_on_8_devices("steps", tmp_path / "steps.json")
    for head_type, by_mesh in results.items():
        for mesh, result in by_mesh.items():
            case = f"{head_type} on {mesh}"
            for loss, expected in zip(result["losses"], result["reference_losses"], strict=True):
                assert loss == pytest.approx(expected, rel=1e-5), case
            assert result["param_relative_diff"] < 1e-5, case
            assert result["moment_relative_diff"] < 1e-5, case
            assert result["codebook_relative_diff"] < 1e-5, case
            assert result["param_max_abs_diff"] < LR_MAX, case
    assert set(results["mha"]) == {"8x1", "4x2", "2x4"}
    assert set(results["shga"]) == {"4x2"}
    # The model axis really splits parameters.
    assert results["mha"]["8x1"]["split_params"] == 0
    assert results["mha"]["4x2"]["split_params"] > 0
    assert results["mha"]["2x4"]["split_params"] > 0
    assert results["shga"]["4x2"]["split_params"] > 0


@pytest.mark.slow
def test_checkpoint_restores_across_mesh_shapes(tmp_path):
    results = run_on_8_devices("checkpoint", tmp_path / "checkpoint.json")
    to_one = results["4x2_to_1x1"]
    assert to_one["max_abs_diff"] == 0.0
    assert to_one["devices"] == [1]
    assert to_one["next_loss_finite"]
    to_eight = results["1x1_to_4x2"]
    assert to_eight["max_abs_diff"] == 0.0
    assert to_eight["devices"] == [8]
    assert to_eight["split_params"] > 0
    assert to_eight["next_loss_finite"]
