"""Training runs through the real command line: resume, signals, NaN guard, checkpoints."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from tests.runs import prepare_corpus, prepare_corpus_from, run_tvq, tvq_command, write_config
from tvq.train.checkpoint import Checkpoints
from tvq.train.config import load_run_config
from tvq.train.metrics_log import truncate_after
from tvq.train.step import Trainer, make_mesh


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("corpus"))


def train_args(config, data_dir, workdir, *overrides):
    sets = [arg for key_value in overrides for arg in ("--set", key_value)]
    return [
        "train", "--config", config, "--data-dir", data_dir, "--workdir", workdir,
        "--no-progress", *sets,
    ]


def restore_state(workdir, step=None):
    config = load_run_config([workdir / "config.yaml"])
    trainer = Trainer(config, make_mesh())
    checkpoints = Checkpoints(workdir / "checkpoints", read_only=True)
    step = checkpoints.latest_step() if step is None else step
    state = checkpoints.restore(step, trainer.abstract_state())
    checkpoints.close()
    return state


def train_lines(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir):
    # Long enough for the signal to land mid-run. Metrics are written every step, so the
    # test can watch progress.
    config = write_config(tmp_path / "tiny.yaml", n_max_step=300, n_save_step=100)

    straight = tmp_path / "straight"
    done = run_tvq(*train_args(config, data_dir, straight))
    assert done.returncode == 0, done.stderr

    interrupted = tmp_path / "interrupted"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        tvq_command(*train_args(config, data_dir, interrupted)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    metrics = interrupted / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received: checkpoint of step" in stderr
    stopped_at = Checkpoints(interrupted / "checkpoints", read_only=True).latest_step()
    assert 10 <= stopped_at < 300
    assert not (interrupted / "train_summary.json").exists()

    resumed = run_tvq(*train_args(config, data_dir, interrupted))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stopped_at} of 300" in resumed.stderr

    assert_trees_equal(restore_state(straight), restore_state(interrupted))
    straight_lines, resumed_lines = train_lines(straight), train_lines(interrupted)
    assert [r["step"] for r in resumed_lines] == list(range(1, 301))
    for a, b in zip(straight_lines, resumed_lines, strict=True):
        assert a["loss"] == b["loss"], a["step"]
    summary = json.loads((interrupted / "train_summary.json").read_text())
    assert summary["step"] == 300
    assert summary["resumed_from"] == stopped_at


def test_retention_keeps_newest_and_best(tmp_path):
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=2)
    state = {"step": np.int32(0), "weights": np.arange(4, dtype=np.float32)}
    # Step 2 has the best loss; step 6 is a signal checkpoint without a validation loss.
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.7, 6: None}
    for step, loss in losses.items():
        checkpoints.save(step, {**state, "step": np.int32(step)}, {"note": step}, loss)
        checkpoints.wait()
    assert checkpoints.steps() == [2, 5, 6]
    assert checkpoints.best_step() == 2
    assert checkpoints.val_loss(2) == 1.0
    assert checkpoints.val_loss(6) is None
    assert checkpoints.read_meta(5)["note"] == 5
    checkpoints.close()


def test_resume_refuses_a_different_model_config(tmp_path, data_dir):
    config = write_config(tmp_path / "tiny.yaml", n_max_step=5)
    assert run_tvq(*train_args(config, data_dir, tmp_path / "run")).returncode == 0

    refused = run_tvq(
        *train_args(config, data_dir, tmp_path / "run", "n_max_step=10", "d_model=48", "seed=3")
    )
    assert refused.returncode == 1
    message = refused.stderr.strip().splitlines()[-1]
    assert "written with a different config" in message
    assert "d_model: 32 -> 48" in message
    assert "seed: 0 -> 3" in message
    assert "n_max_step" not in message
    assert Checkpoints(tmp_path / "run" / "checkpoints", read_only=True).steps() == [5]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, data_dir):
    config = write_config(tmp_path / "tiny.yaml", n_max_step=10)
    workdir = tmp_path / "run"
    assert run_tvq(*train_args(config, data_dir, workdir)).returncode == 0
    good = restore_state(workdir)

    # Resuming with an absurd learning rate overflows the parameters within a step or two.
    diverged = run_tvq(*train_args(config, data_dir, workdir, "n_max_step=30", "lr_max=1e30"))
    assert diverged.returncode == 1
    message = diverged.stderr.strip().splitlines()[-1]
    assert re.search(r"loss became (nan|inf) at step 1[1-3];", message), message
    assert "the newest checkpoint, step 10, is intact" in message
    assert Checkpoints(workdir / "checkpoints", read_only=True).steps() == [5, 10]
    assert_trees_equal(restore_state(workdir), good)
    assert np.isfinite(np.asarray(good["params"]["embed"]["embedding"])).all()
    assert not (workdir / "train_summary.json").exists()


def test_corrupt_checkpoint_is_reported_and_left_in_place(tmp_path, data_dir):
    config = write_config(tmp_path / "tiny.yaml", n_max_step=10)
    workdir = tmp_path / "run"
    assert run_tvq(*train_args(config, data_dir, workdir)).returncode == 0
    state_dir = workdir / "checkpoints" / "10" / "state"
    for path in state_dir.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "ocdbt" in str(path.parent):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    failed = run_tvq(*train_args(config, data_dir, workdir, "n_max_step=20"))
    assert failed.returncode == 1
    message = failed.stderr.strip().splitlines()[-1]
    assert f"checkpoint {workdir / 'checkpoints' / '10'} cannot be read" in message
    assert "left in place" in message
    assert "Traceback" not in failed.stderr
    assert (workdir / "checkpoints" / "10" / "state").is_dir()
    assert Checkpoints(workdir / "checkpoints", read_only=True).steps() == [5, 10]


def test_too_small_vocabulary_is_rejected(tmp_path, data_dir):
    config = write_config(tmp_path / "tiny.yaml", n_vocab=100)
    failed = run_tvq(*train_args(config, data_dir, tmp_path / "run"))
    assert failed.returncode == 1
    assert "n_vocab 100 is smaller than the 259 token ids" in failed.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_and_invalid_keys_are_reported_together(tmp_path, data_dir):
    config = write_config(tmp_path / "tiny.yaml")
    failed = run_tvq(*train_args(config, data_dir, tmp_path / "run", "lr_mx=1", "d_model=-4"))
    assert failed.returncode == 1
    assert "unknown config key(s) lr_mx" in failed.stderr
    failed = run_tvq(
        *train_args(config, data_dir, tmp_path / "run", "d_model=-4", "optimizer=sgd")
    )
    line = failed.stderr.strip().splitlines()[-1]
    assert "d_model must be a positive integer, got -4" in line
    assert "unknown optimizer 'sgd'" in line


def test_two_devices_train_like_one(tmp_path, data_dir):
    config = write_config(tmp_path / "tiny.yaml", n_max_step=6, p_dropres=0.0)
    one = run_tvq(*train_args(config, data_dir, tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    two = subprocess.run(
        tvq_command(*train_args(config, data_dir, tmp_path / "two")),
        capture_output=True, text=True, env={**env, "JAX_PLATFORMS": "cpu"}, timeout=300,
    )
    assert two.returncode == 0, two.stderr
    assert "2 cpu device(s), mesh data=2 model=1" in two.stderr
    losses_one = [r["loss"] for r in train_lines(tmp_path / "one")]
    losses_two = [r["loss"] for r in train_lines(tmp_path / "two")]
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)


def test_missing_optional_logger_is_rejected(tmp_path, data_dir):
    if importlib.util.find_spec("tensorboardX") is not None:
        pytest.skip("tensorboardX is installed, so the missing-package error cannot occur")
    config = write_config(tmp_path / "tiny.yaml")
    failed = run_tvq(*train_args(config, data_dir, tmp_path / "run", "tensorboard=true"))
    assert failed.returncode == 1
    assert "tensorboard: true needs the tensorboardX package" in failed.stderr
    assert not (tmp_path / "run").exists()


def test_full_attention_baseline_trains_and_resumes(tmp_path, data_dir):
    # attn_type "full" has no codebook, so its state carries an empty codebook tree.
    config = write_config(tmp_path / "tiny.yaml", n_max_step=4, n_save_step=2, attn_type="full")
    done = run_tvq(*train_args(config, data_dir, tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    resumed = run_tvq(*train_args(config, data_dir, tmp_path / "run", "n_max_step=6"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 4 of 6" in resumed.stderr
    state = restore_state(tmp_path / "run")
    assert int(state["step"]) == 6
    assert state["codebook"] == {}


def test_second_run_on_a_workdir_is_rejected(tmp_path, data_dir):
    config = write_config(tmp_path / "tiny.yaml", n_max_step=3000, n_save_step=1000)
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    first = subprocess.Popen(
        tvq_command(*train_args(config, data_dir, workdir)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not (workdir / "metrics.jsonl").exists() or not train_lines(workdir):
            assert time.monotonic() < deadline
            assert first.poll() is None
            time.sleep(0.05)
        second = run_tvq(*train_args(config, data_dir, workdir))
        assert second.returncode == 1
        line = second.stderr.strip().splitlines()[-1]
        assert f"workdir {workdir} is in use by another tvq train (process {first.pid})" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM


def test_resume_rejects_other_data_and_a_shorter_run(tmp_path, data_dir):
    config = write_config(tmp_path / "tiny.yaml", n_max_step=5)
    workdir = tmp_path / "run"
    assert run_tvq(*train_args(config, data_dir, workdir)).returncode == 0
    other = prepare_corpus_from(tmp_path / "other", seed=1)

    moved = run_tvq(*train_args(config, other, workdir, "n_max_step=10"))
    assert moved.returncode == 1
    line = moved.stderr.strip().splitlines()[-1]
    assert "was trained on other data than the text data now in --data-dir" in line
    assert f"or delete {workdir}" in line

    shorter = run_tvq(*train_args(config, data_dir, workdir, "n_max_step=3"))
    assert shorter.returncode == 1
    assert "is past n_max_step 3; set n_max_step to at least 5" in shorter.stderr


def test_bad_token_files_are_reported_in_one_line(tmp_path, data_dir):
    config = write_config(tmp_path / "tiny.yaml", n_max_step=3)
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    train_file = broken / "train.npy"
    train_file.write_bytes(train_file.read_bytes()[:1000])
    failed = run_tvq(*train_args(config, broken, tmp_path / "run"))
    assert failed.returncode == 1
    assert "train.npy is truncated or corrupt" in failed.stderr.strip().splitlines()[-1]
    assert "Traceback" not in failed.stderr

    shutil.copy(data_dir / "train.npy", train_file)
    tokens = np.load(broken / "validation.npy")
    tokens[10] = 400
    np.save(broken / "validation.npy", tokens)
    failed = run_tvq(*train_args(config, broken, tmp_path / "run"))
    assert "contains token id 400, outside the model's n_vocab 259" in failed.stderr

    (broken / "manifest.json").write_text("{not json")
    failed = run_tvq(*train_args(config, broken, tmp_path / "run"))
    assert "manifest.json is not valid JSON" in failed.stderr
    assert not (tmp_path / "run").exists()


def test_metrics_lines_are_repaired_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kind": "train"}\n5\n{"step": 2, "kind": "train"}\n{"step": 3')
    assert truncate_after(path, 2) == 2
    assert path.read_text() == '{"step": 1, "kind": "train"}\n{"step": 2, "kind": "train"}\n'
    path.write_text('{"step": 1, "kind": "train"}')
    assert truncate_after(path, 2) == 0
    assert path.read_text().endswith("}\n")
