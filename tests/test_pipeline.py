"""The Snakemake pipeline, its profiles and the DVC stages, run for real.

Every test works in a temporary copy of the repository and runs this environment's
`snakemake`, `tvq` and `dvc` executables. The end-to-end tests run the smoke preset on
SAMPLE, a Wikipedia XML excerpt kept beside the repository, and skip when it is absent.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "enwiki-sample.xml.bz2"
BIN = Path(sys.executable).parent

# Top-level entries not copied: environments, version-control data and pipeline outputs.
NOT_COPIED = {
    ".git", ".venv", ".snakemake", "data", "runs", "results", "logs", "benchmarks",
    "resources", "dvc_plots", "build", "dist", ".pytest_cache", ".ruff_cache",
}

SMOKE_TARGET = "results/enwik8/test_bpb.json"
ALL_RESULTS = [
    "results/enwik8/validation_bpb.json",
    "results/enwik8/test_bpb.json",
    "results/pg19/test_ppl.json",
    "results/imagenet64/test_bpb.json",
]
# Fields every result JSON carries, whatever the dataset.
RESULT_FIELDS = {
    "dataset", "split", "metric", "value", "scored_tokens", "scored_bytes", "preset",
    "param_count", "checkpoint_step", "input_sha256", "canonical", "wall_time_s",
    "tvq_version", "partial",
}


def copy_repo(dest: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name == "__pycache__" or name.endswith(".egg-info")}
        if Path(folder) == REPO:
            skipped |= NOT_COPIED & set(names)
        return skipped

    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)
    return dest


def pipeline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The rules and the DVC stages call `tvq` and `snakemake` from PATH.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("SNAKEMAKE_PROFILE", None)
    env["DVC_NO_ANALYTICS"] = "1"
    env.update(extra)
    return env


def run(
    root: Path, *command: str | Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command in root, with stderr folded into stdout."""
    return subprocess.run(
        [str(part) for part in command], cwd=root, env=env or pipeline_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )


def snakemake(root: Path, *args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return run(root, BIN / "snakemake", *args, **kwargs)


def dvc(root: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(root, BIN / "dvc", *args, **kwargs)


def smoke_config() -> list[str]:
    return ["--config", "preset=smoke", f"enwik8_source={SAMPLE}"]


def require_sample() -> None:
    if not SAMPLE.is_file():
        pytest.skip(f"the enwiki sample {SAMPLE} is absent; it is not part of the repository")


def find_train_process(parent: psutil.Process) -> psutil.Process | None:
    """Return the `tvq train` Python process below parent (not the shell that started it)."""
    for child in parent.children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if len(command) > 2 and Path(command[1]).name == "tvq" and command[2] == "train":
            return child
    return None


def read_text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


@dataclass
class SmokeRun:
    root: Path
    killed: subprocess.CompletedProcess
    killed_train_log: str
    completed: subprocess.CompletedProcess
    completed_train_log: str
    repeated: subprocess.CompletedProcess
    result: dict


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """Run the smoke target three times: stopped by a SIGTERM to training, then to the
    end (resuming), then again with nothing left to do."""
    require_sample()
    root = copy_repo(tmp_path_factory.mktemp("smoke") / "repo")
    command = [BIN / "snakemake", "--cores", "1", SMOKE_TARGET, *smoke_config()]
    train_log = root / "logs" / "train" / "enwik8_smoke.log"

    # Stop training once its first step has run, so a checkpoint of a step > 0 is saved.
    first_output = root.parent / "first_run.txt"
    with first_output.open("w") as output:
        first = subprocess.Popen(
            [str(part) for part in command], cwd=root, env=pipeline_env(),
            stdout=output, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 300
        while "first step" not in read_text(train_log):
            if first.poll() is not None or time.monotonic() > deadline:
                first.kill()
                pytest.fail(
                    "training did not reach its first step; snakemake output:\n"
                    + first_output.read_text() + "\ntrain log:\n" + read_text(train_log)
                )
            time.sleep(0.1)
        train_process = find_train_process(psutil.Process(first.pid))
        assert train_process is not None, "no `tvq train` process below snakemake"
        os.kill(train_process.pid, signal.SIGTERM)
        first.wait(timeout=300)
    killed = subprocess.CompletedProcess(command, first.returncode, first_output.read_text())
    killed_train_log = read_text(train_log)

    completed = snakemake(root, "--cores", "1", SMOKE_TARGET, *smoke_config())
    completed_train_log = read_text(train_log)
    repeated = snakemake(root, "--cores", "1", SMOKE_TARGET, *smoke_config())
    assert completed.returncode == 0, completed.stdout
    result = json.loads((root / SMOKE_TARGET).read_text())
    return SmokeRun(
        root, killed, killed_train_log, completed, completed_train_log, repeated, result
    )


@pytest.mark.slow
def test_smoke_result_has_every_field(smoke_run):
    result = smoke_run.result
    assert RESULT_FIELDS <= set(result), f"missing {sorted(RESULT_FIELDS - set(result))}"
    assert result["dataset"] == "enwik8"
    assert result["split"] == "test"
    assert result["preset"] == "smoke"
    # The sample is not the canonical enwik8, and the whole split was scored.
    assert result["canonical"] is False
    assert result["partial"] is False
    assert result["scored_tokens"] > 0
    assert result["scored_bytes"] > 0
    assert result["param_count"] > 0


@pytest.mark.slow
def test_smoke_bpb_is_finite_and_below_8(smoke_run):
    value = smoke_run.result["value"]
    assert math.isfinite(value)
    # A uniform guess over the 256 byte values scores 8 bits per byte.
    assert 0 < value < 8


@pytest.mark.slow
def test_smoke_writes_log_and_benchmark_per_rule(smoke_run):
    for name in ("prepare/enwik8", "train/enwik8_smoke", "evaluate/enwik8_test_bpb"):
        log = smoke_run.root / "logs" / f"{name}.log"
        assert log.is_file(), f"{log} missing"
        assert log.stat().st_size > 0, f"{log} is empty"
        benchmark = smoke_run.root / "benchmarks" / f"{name}.tsv"
        assert benchmark.is_file(), f"{benchmark} missing"
    # Every job Snakemake ran named a log file that exists.
    logs = re.findall(r"^\s+log: (\S+)", smoke_run.completed.stdout, flags=re.MULTILINE)
    assert logs
    for log in logs:
        assert (smoke_run.root / log).is_file(), f"{log} missing"


@pytest.mark.slow
def test_train_resumes_after_sigterm(smoke_run):
    assert smoke_run.killed.returncode != 0, smoke_run.killed.stdout
    saved = re.search(
        r"SIGTERM received: checkpoint of step (\d+) saved", smoke_run.killed_train_log
    )
    assert saved, smoke_run.killed_train_log
    step = int(saved.group(1))
    assert step > 0

    assert f"resumed from step {step} of " in smoke_run.completed_train_log
    run_dir = smoke_run.root / "runs" / "enwik8" / "smoke"
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["resumed_from"] == step
    # The rerun only trained the steps after the saved one.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert summary["steps_this_run"] == config["n_max_step"] - step
    assert summary["step"] == config["n_max_step"]


@pytest.mark.slow
def test_smoke_second_invocation_does_nothing(smoke_run):
    assert smoke_run.repeated.returncode == 0, smoke_run.repeated.stdout
    assert "Nothing to be done" in smoke_run.repeated.stdout


@pytest.mark.slow
def test_sample_rule_writes_text(smoke_run):
    target = "results/enwik8/samples.txt"
    sampled = snakemake(
        smoke_run.root, "--cores", "1", target, *smoke_config(), "sample_num_tokens=60",
        "sample_num_samples=2",
    )
    assert sampled.returncode == 0, sampled.stdout
    # Only the sampling job ran: it reuses the trained checkpoint.
    jobs = re.findall(r"^(?:local)?rule (\w+):", sampled.stdout, flags=re.MULTILINE)
    assert jobs == ["sample_text"]
    text = (smoke_run.root / target).read_text()
    assert text.startswith("=== sample 1 of 2 ===\n")
    assert "=== sample 2 of 2 ===" in text
    log = (smoke_run.root / "logs" / "sample" / "enwik8.log").read_text()
    assert "generated 2 x 60 tokens" in log


@pytest.mark.slow
def test_dvc_repro_runs_and_records_smoke(smoke_run, tmp_path):
    # A DVC user's clone of the smoke run: the checkpoints are reused, so training only
    # resumes at its last step, but every stage runs through Snakemake.
    root = tmp_path / "repo"
    shutil.copytree(smoke_run.root, root, symlinks=True)
    settings = yaml.safe_load((root / "config" / "config.yaml").read_text())
    settings.update(
        preset="smoke", enwik8_source=str(SAMPLE), datasets=["enwik8"],
        throughput_preset="tiny", throughput_sequence_lens=[128], throughput_budget_s=60,
    )
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    for command in (
        # The repository comes with .dvc/ and a .gitignore for the pipeline's folders.
        ["git", "init", "--quiet"],
        [BIN / "dvc", "config", "core.analytics", "false"],
        [BIN / "dvc", "config", "core.check_update", "false"],
        ["git", "add", "--all", ":!results"],
        ["git", "-c", "user.name=tvq", "-c", "user.email=tvq@localhost", "commit", "-qm", "x"],
    ):
        setup = run(root, *command)
        assert setup.returncode == 0, f"{command}: {setup.stdout}"

    first = dvc(root, "repro")
    assert first.returncode == 0, first.stdout
    stages = ("prepare@enwik8", "train@enwik8", "evaluate@enwik8", "throughput", "report")
    for stage in stages:
        assert f"Running stage '{stage}'" in first.stdout, first.stdout
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(stages) <= set(lock["stages"])
    assert (root / "results/notebooks/results.html").stat().st_size > 0
    # persist: true kept the checkpoints, so training resumed instead of starting over.
    assert "resumed from step" in (root / "logs" / "train" / "enwik8_smoke.log").read_text()

    # The report stage always runs, because DVC cannot list each dataset's results as
    # its dependencies; Snakemake then finds every notebook up to date.
    second = dvc(root, "repro")
    assert second.returncode == 0, second.stdout
    ran = re.findall(r"Running stage '([^']+)'", second.stdout)
    assert ran == ["report"], second.stdout
    assert "Nothing to be done" in second.stdout

    test_bpb = json.loads((root / SMOKE_TARGET).read_text())["value"]
    metrics_json = dvc(root, "metrics", "show", "--json")
    assert metrics_json.returncode == 0, metrics_json.stdout
    metrics = json.loads(metrics_json.stdout)[""]["data"][SMOKE_TARGET]["data"]
    assert metrics["value"] == pytest.approx(test_bpb)
    table = dvc(root, "metrics", "show")
    assert table.returncode == 0, table.stdout
    test_row = next(line for line in table.stdout.splitlines() if line.startswith(SMOKE_TARGET))
    assert f"{round(test_bpb, 5):g}" in test_row.split()

    plots = dvc(root, "plots", "show", "--json")
    assert plots.returncode == 0, plots.stdout
    assert "train_curve.csv" in plots.stdout
    assert "speedup.png" in plots.stdout


@pytest.fixture(scope="module")
def dry_repo(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("dry") / "repo")


@pytest.mark.parametrize("preset", ["smoke", "cpu", "paper"])
def test_dry_run_resolves_every_target(dry_repo, preset):
    planned = snakemake(dry_repo, "-n", *ALL_RESULTS, "all", "--config", f"preset={preset}")
    assert planned.returncode == 0, planned.stdout
    for path in ALL_RESULTS:
        assert f"output: {path}" in planned.stdout
    for dataset in ("enwik8", "pg19", "imagenet64"):
        assert f"runs/{dataset}/{preset}/train_summary.json" in planned.stdout
    assert "resources/vocab/pg19.model" in planned.stdout


def test_dataset_target_rules_resolve(dry_repo):
    planned = snakemake(dry_repo, "-n", "enwik8", "pg19", "imagenet64")
    assert planned.returncode == 0, planned.stdout
    for path in ALL_RESULTS:
        assert f"output: {path}" in planned.stdout


def test_sample_targets_resolve(dry_repo):
    planned = snakemake(dry_repo, "-n", "samples", "results/pg19/samples.txt")
    assert planned.returncode == 0, planned.stdout
    for path in ("results/enwik8/samples.txt", "results/pg19/samples.txt",
                 "results/imagenet64/samples.txt", "results/imagenet64/samples.png"):
        assert path in planned.stdout
    assert "rule sample_images:" in planned.stdout
    # Text datasets have no image output.
    wrong = snakemake(dry_repo, "-n", "results/enwik8/samples.png")
    assert wrong.returncode != 0
    # An imagenet64 sample that cannot fit in one image fails while planning.
    too_long = snakemake(dry_repo, "-n", "results/imagenet64/samples.png", "--config",
                         "sample_num_tokens=20000")
    assert too_long.returncode != 0
    assert "sample_num_tokens 20000 plus the 0-byte prompt is more than the 12288" \
        in too_long.stdout


def test_tpu_profile_resolves_by_name(dry_repo):
    planned = snakemake(dry_repo, "--profile", "tpu", "-n", SMOKE_TARGET)
    assert planned.returncode == 0, planned.stdout
    # The workflow profile profiles/default is applied as well.
    assert re.search(r"Using profiles? tpu\b", planned.stdout), planned.stdout
    # tpu/pipeline_config.yaml selects the paper preset and the launcher tpu/launch.sh.
    assert "runs/enwik8/paper/train_summary.json" in planned.stdout
    assert "tpu/launch.sh tvq train" in planned.stdout
    assert "tpu/launch.sh tvq evaluate" in planned.stdout


def test_gpu_profile_resolves_by_name(dry_repo):
    planned = snakemake(dry_repo, "--profile", "gpu", "-n", SMOKE_TARGET)
    assert planned.returncode == 0, planned.stdout
    assert re.search(r"Using profiles? gpu\b", planned.stdout), planned.stdout
    assert "runs/enwik8/paper/train_summary.json" in planned.stdout
    # The rules' accelerators become one SLURM GPU for training and evaluation.
    resources = re.findall(r"^\s+resources: (.*)$", planned.stdout, flags=re.MULTILINE)
    assert sum("gpu=1" in line for line in resources) == 2, resources
    accelerator_jobs = [line for line in resources if "gpu=1" in line]
    assert all("nodes=1" in line and "tasks=1" in line for line in accelerator_jobs), resources
    # One tvq process per SLURM task.
    assert "srun tvq train" in planned.stdout
    assert "srun tvq evaluate" in planned.stdout


def test_tpu_launcher_runs_command_locally(tmp_path):
    # Without TVQ_TPU_NAME the launcher is a plain exec, so single-host runs need no gcloud.
    env = pipeline_env()
    env.pop("TVQ_TPU_NAME", None)
    launched = run(tmp_path, REPO / "tpu" / "launch.sh", "sh", "-c", "echo ran in $PWD", env=env)
    assert launched.returncode == 0, launched.stdout
    assert launched.stdout.strip() == f"ran in {tmp_path}"


def test_tpu_launcher_fans_out_with_distributed_start(tmp_path):
    # gcloud is not installed here: a stand-in on PATH records what the launcher passes it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = pipeline_env(TVQ_TPU_NAME="pod", TVQ_TPU_ZONE="zone-a")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    launched = run(tmp_path, REPO / "tpu" / "launch.sh", "tvq", "train", "--workdir", "w", env=env)
    assert launched.returncode == 0, launched.stdout
    arguments = launched.stdout.splitlines()
    assert arguments[:4] == ["compute", "tpus", "tpu-vm", "ssh"]
    assert "--worker=all" in arguments
    remote = arguments[arguments.index("--command") + 1]
    assert "export TVQ_DISTRIBUTED=auto" in remote
    assert remote.endswith("tvq train --workdir w ")


@pytest.mark.parametrize(
    "setting, message",
    [
        ("preset=huge", "'huge' is not one of ['smoke', 'cpu', 'paper']"),
        ("global_batch_size=-4", "-4 is less than the minimum of 1"),
        ("datasets=[enwik8,mnist]", "'mnist' is not one of"),
        ("prest=smoke", "'prest' was unexpected"),
    ],
)
def test_invalid_config_fails_before_any_job(tmp_path, setting, message):
    root = copy_repo(tmp_path / "repo")
    rejected = snakemake(root, "--cores", "1", SMOKE_TARGET, "--config", setting)
    assert rejected.returncode != 0
    assert "Error validating config file" in rejected.stdout, rejected.stdout
    assert message in rejected.stdout, rejected.stdout
    for output in ("logs", "data", "runs", "results", "resources"):
        assert not (root / output).exists(), f"{output}/ was created"


def offline_command() -> tuple[list[str], dict[str, str]]:
    """Return a command prefix and environment that keep a process off the network."""
    probe = subprocess.run(["unshare", "--net", "--map-root-user", "true"], capture_output=True)
    if probe.returncode == 0:
        return ["unshare", "--net", "--map-root-user"], pipeline_env()
    # Without network namespaces, send HTTP through a proxy port that nothing listens on.
    proxy = "http://127.0.0.1:9"
    return [], pipeline_env(http_proxy=proxy, https_proxy=proxy, no_proxy="")


def test_offline_enwik8_download_fails_fast(tmp_path):
    root = copy_repo(tmp_path / "repo")
    prefix, env = offline_command()
    command = [*prefix, str(BIN / "snakemake"), "--cores", "1", "data/enwik8/manifest.json"]
    # A session of its own, so that a timeout stops tvq prepare too, not only snakemake.
    with subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail("the download without network did not fail within 20 s")
    assert process.returncode != 0
    assert "--config enwik8_source=PATH" in output, output
    data = root / "data" / "enwik8"
    assert not data.exists() or not any(data.iterdir()), "partial data/enwik8 left behind"
    downloads = root / "resources" / "downloads"
    assert not downloads.exists() or not any(downloads.iterdir()), "partial download left"
