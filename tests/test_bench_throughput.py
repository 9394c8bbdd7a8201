"""`tvq bench throughput` and `tvq bench flops`: rows for every configuration, FLOP counts."""

from __future__ import annotations

import csv
import math
import signal
import subprocess

import pytest

from tests.runs import run_tvq, tvq_command
from tvq.bench import flops
from tvq.bench.throughput import COLUMNS, SPEEDUP_COLUMNS, read_rows
from tvq.model.config import HEAD_TYPES, TransformerConfig

TINY = ("--preset", "tiny", "--sequence-lens", "128", "--matmul-size", "256")


def read_csv(path):
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_throughput_rows_for_every_combination(tmp_path):
    out, speedup_out = tmp_path / "throughput.csv", tmp_path / "speedup.csv"
    result = run_tvq(
        "bench", "throughput", *TINY, "--repeats", "2",
        "--out", out, "--speedup-out", speedup_out,
    )
    assert result.returncode == 0, result.stderr

    columns, records = read_csv(out)
    assert columns == COLUMNS
    rows = read_rows(out)
    combinations = sorted((r.head_type, r.attn_type) for r in rows)
    assert combinations == sorted((h, a) for h in HEAD_TYPES for a in ("vq", "full"))
    for r in rows:
        assert r.status == "ok", r
        assert r.repeats == 2
        assert r.batch_size == 2  # 256 tokens per step at T = 128
        assert r.step_s_min <= r.step_s_median <= r.step_s_max
        assert r.tokens_per_s == pytest.approx(r.batch_size * 128 / r.step_s_median, rel=1e-4)
        assert r.gflop_per_s == pytest.approx(r.train_gflop_per_token * r.tokens_per_s, rel=1e-4)
        assert r.mfu == pytest.approx(r.gflop_per_s / r.matmul_gflop_per_s, rel=1e-4)
        assert r.mfu_reference == "matmul"
        assert r.peak_memory_gib > 0
        assert r.compile_s > 0

    columns, speedups = read_csv(speedup_out)
    assert columns == SPEEDUP_COLUMNS
    assert sorted(s["head_type"] for s in speedups) == sorted(HEAD_TYPES)
    by_key = {(r.head_type, r.attn_type): r for r in rows}
    for s in speedups:
        vq, full = by_key[(s["head_type"], "vq")], by_key[(s["head_type"], "full")]
        assert float(s["speedup"]) == pytest.approx(vq.tokens_per_s / full.tokens_per_s, rel=1e-4)
        assert float(s["vq_of_shortest"]) == 1.0


def test_throughput_over_budget_row(tmp_path):
    out = tmp_path / "throughput.csv"
    result = run_tvq(
        "bench", "throughput", *TINY, "--head-types", "shga", "--budget-s", "1e-9",
        "--out", out,
    )
    assert result.returncode == 0, result.stderr

    rows = read_rows(out)
    assert [r.attn_type for r in rows] == ["vq", "full"]
    for r in rows:
        # The warm-up step is the one sample when the budget runs out during it.
        assert r.status == "over budget"
        assert r.repeats == 1
        assert math.isfinite(r.tokens_per_s)
    assert "over budget" in result.stdout


def test_throughput_out_of_memory_row(tmp_path):
    out, speedup_out = tmp_path / "throughput.csv", tmp_path / "speedup.csv"
    result = run_tvq(
        "bench", "throughput", *TINY, "--head-types", "mqa", "--max-memory-gib", "1e-6",
        "--out", out, "--speedup-out", speedup_out,
    )
    assert result.returncode == 0, result.stderr

    rows = read_rows(out)
    assert len(rows) == 2
    for r in rows:
        assert r.status == "out of memory"
        assert r.repeats == 0
        assert math.isnan(r.tokens_per_s)
        assert math.isnan(r.mfu)
        # The compiled program's size that did not fit is recorded.
        assert r.peak_memory_gib > 1e-6
    _, speedups = read_csv(speedup_out)
    assert speedups[0]["speedup"] == "nan"
    assert speedups[0]["full_status"] == "out of memory"


def test_throughput_rejects_bad_length(tmp_path):
    out = tmp_path / "results" / "throughput.csv"
    result = run_tvq("bench", "throughput", "--preset", "tiny", "--sequence-lens", "100",
                     "--out", out)
    assert result.returncode == 1
    assert "multiples of the block length 32" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("attn_type", ["vq", "full"])
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_analytic_flops_match_xla(attn_type, head_type):
    # Two layers here: the check compiles a one-layer copy, because XLA counts the
    # scanned layer stack once.
    config = TransformerConfig(
        n_vocab=259, d_model=128, d_k=32, n_code=32, n_layer=2, block_len=32,
        sequence_len=128, attn_type=attn_type, head_type=head_type, dtype="float32",
    )
    check = flops.check(config)
    assert check.forward_ratio == pytest.approx(1.0, abs=0.1)
    assert check.train_ratio == pytest.approx(1.0, abs=0.1)


def test_flop_check_counts_every_full_attention_block():
    # Unrolling the block scan is what makes XLA count all of them: with 8 blocks the
    # score matmuls dominate, so counting one block would miss most of them.
    config = TransformerConfig(
        n_vocab=259, d_model=64, d_k=64, n_code=16, n_layer=1, block_len=32,
        sequence_len=256, attn_type="full", head_type="mha", dtype="float32",
    )
    check = flops.check(config)
    assert check.forward_ratio == pytest.approx(1.0, abs=0.1)


def test_bench_flops_command_prints_ratios():
    result = run_tvq(
        "bench", "flops", "--d-model", "64", "--d-k", "16", "--n-code", "16",
        "--block-len", "32", "--sequence-len", "128", "--head-types", "shga",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("attn")
    assert [line.split()[:2] for line in lines[1:]] == [["vq", "shga"], ["full", "shga"]]


@pytest.mark.slow
def test_pipeline_throughput_rule(tmp_path):
    from tests.test_pipeline import copy_repo, snakemake

    root = copy_repo(tmp_path / "repo")
    result = snakemake(
        root, "--cores", "1", "results/throughput/throughput.csv",
        "--config", "throughput_preset=tiny", "throughput_sequence_lens=[128]",
        "throughput_budget_s=60",
    )
    assert result.returncode == 0, result.stdout

    rows = read_rows(root / "results/throughput/throughput.csv")
    assert len(rows) == 2 * len(HEAD_TYPES)
    assert {r.preset for r in rows} == {"tiny"}
    _, speedups = read_csv(root / "results/throughput/speedup.csv")
    assert len(speedups) == len(HEAD_TYPES)
    assert (root / "logs/bench/throughput.log").stat().st_size > 0
    assert (root / "benchmarks/bench/throughput.tsv").exists()


def test_throughput_rejects_same_output_paths(tmp_path):
    out = tmp_path / "same.csv"
    result = run_tvq("bench", "throughput", *TINY, "--out", out, "--speedup-out", out)
    assert result.returncode == 2
    assert "name the same file" in result.stderr
    assert not out.exists()


def test_throughput_sigterm_keeps_old_table(tmp_path):
    out = tmp_path / "throughput.csv"
    out.write_text("an earlier table\n")
    process = subprocess.Popen(
        tvq_command("bench", "throughput", *TINY, "--repeats", "1", "--out", out),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Stop it once the first row is printed, in the middle of the run.
    for line in process.stdout:
        if line.startswith("float32"):
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 143, stderr
    assert "terminated" in stderr
    assert out.read_text() == "an earlier table\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["throughput.csv"]
