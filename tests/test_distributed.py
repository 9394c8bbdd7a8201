"""Multi-process training: two real JAX processes on 127.0.0.1, joined by the
coordinator and gloo collectives, against one process training the same global batches."""

import json
import os
import socket
import subprocess

import pytest

from tests.runs import prepare_corpus, tvq_command, write_config
from tvq.distributed import detected_cluster, initialize
from tvq.model.config import ConfigError

# Two sequences per process and step; checkpoints at steps 3 and 6, then 9 on resuming.
SETTINGS = {"global_batch_size": 4, "n_max_step": 6, "n_save_step": 3, "n_print_step": 1}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for name in ("XLA_FLAGS", "SLURM_NTASKS", "SLURM_JOB_ID", "TVQ_DISTRIBUTED"):
        env.pop(name, None)
    return env


def two_processes(command, *args) -> list[subprocess.CompletedProcess]:
    """Run `tvq COMMAND ARGS` as processes 0 and 1 of one job; return both results."""
    address = f"127.0.0.1:{free_port()}"
    children = [
        subprocess.Popen(
            tvq_command(command, *args, "--no-progress", "--coordinator-address", address,
                        "--num-processes", "2", "--process-id", str(index)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
        )
        for index in range(2)
    ]
    results = []
    for child in children:
        output, _ = child.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(child.args, child.returncode, output))
    return results


def one_process(command, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        tvq_command(command, *args, "--no-progress"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=child_env(), timeout=600,
    )


def read_metrics(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A two-process run of 6 steps resumed to 9, and a one-process run of the same."""
    folder = tmp_path_factory.mktemp("distributed")
    data = prepare_corpus(folder)
    config = write_config(folder / "config.yaml", **SETTINGS)
    common = ["--config", config, "--data-dir", data]

    first = two_processes("train", *common, "--workdir", folder / "two")
    resumed = two_processes("train", *common, "--workdir", folder / "two", "--set", "n_max_step=9")
    single = one_process("train", *common, "--workdir", folder / "one", "--set", "n_max_step=9")
    return folder, first, resumed, single


@pytest.mark.slow
def test_both_processes_finish(runs):
    _, first, resumed, single = runs
    for result in [*first, *resumed, single]:
        assert result.returncode == 0, result.stdout[-3000:]
    for index, result in enumerate(first):
        assert f"process {index} of 2 joined the job" in result.stdout
        assert "2 global devices" in result.stdout
    for result in resumed:
        assert "resumed from step 6 of 9" in result.stdout


@pytest.mark.slow
def test_one_set_of_metrics_and_checkpoints(runs):
    folder = runs[0]
    metrics = read_metrics(folder / "two")
    train_steps = [record["step"] for record in metrics if record["kind"] == "train"]
    assert train_steps == list(range(1, 10))
    validation_steps = [record["step"] for record in metrics if record["kind"] == "validation"]
    assert validation_steps == [3, 6, 9]
    checkpoints = sorted(int(path.name) for path in (folder / "two" / "checkpoints").iterdir()
                         if path.name.isdigit())
    assert checkpoints[-1] == 9
    summary = json.loads((folder / "two" / "train_summary.json").read_text())
    assert summary["resumed_from"] == 6
    assert summary["step"] == 9


@pytest.mark.slow
def test_two_processes_match_one(runs):
    folder = runs[0]
    two = read_metrics(folder / "two")
    one = read_metrics(folder / "one")
    assert [(r["step"], r["kind"]) for r in two] == [(r["step"], r["kind"]) for r in one]
    for split_run, whole_run in zip(two, one, strict=True):
        key = "loss" if split_run["kind"] == "train" else "val_loss"
        assert split_run[key] == pytest.approx(whole_run[key], rel=1e-5), split_run["step"]


@pytest.mark.slow
def test_two_processes_sample_like_one(runs):
    folder = runs[0]
    options = ["--workdir", folder / "two", "--data-dir", folder / "data", "--num-tokens", "50",
               "--num-samples", "2", "--seed", "3"]
    split = two_processes("sample", *options, "--out", folder / "two_samples.txt")
    for result in split:
        assert result.returncode == 0, result.stdout[-3000:]
    whole = one_process("sample", *options, "--out", folder / "one_sample.txt")
    assert whole.returncode == 0, whole.stdout[-3000:]
    assert (folder / "two_samples.txt").read_text() == (folder / "one_sample.txt").read_text()


@pytest.mark.slow
def test_two_processes_evaluate_like_one(runs):
    folder = runs[0]
    options = ["--workdir", folder / "two", "--data-dir", folder / "data", "--split", "test"]
    split = two_processes("evaluate", *options, "--out", folder / "two_test.json")
    for result in split:
        assert result.returncode == 0, result.stdout[-3000:]
    whole = one_process("evaluate", *options, "--out", folder / "one_test.json")
    assert whole.returncode == 0, whole.stdout[-3000:]
    split_result = json.loads((folder / "two_test.json").read_text())
    whole_result = json.loads((folder / "one_test.json").read_text())
    assert split_result["scored_tokens"] == whole_result["scored_tokens"]
    assert split_result["value"] == pytest.approx(whole_result["value"], rel=1e-5)
    assert split_result["device"].startswith("2 x ")


def test_partial_process_options_are_rejected():
    with pytest.raises(ConfigError, match="--num-processes given without --coordinator-address"):
        initialize(num_processes=2)
    with pytest.raises(ConfigError, match="--process-id 2 is outside 0 .. 1"):
        initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ConfigError, match="has no port"):
        initialize("127.0.0.1", 2, 0)


def test_cluster_detection(monkeypatch):
    for name in ("SLURM_NTASKS", "SLURM_JOB_ID", "TVQ_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert detected_cluster() is None
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert detected_cluster() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert detected_cluster() == "SLURM job 42 with 4 tasks"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TVQ_DISTRIBUTED", "auto")
    assert detected_cluster() == "TVQ_DISTRIBUTED=auto"
