"""The result notebooks, `tvq report` and the loaders in tvq.report, on hand-written files.

The fixtures follow the formats that `tvq evaluate`, `tvq train` and `tvq bench
throughput` write, including non-canonical and partial results and throughput rows that
ran out of memory, failed or ran over the time budget. The notebook tests run the real
`tvq report` command in a child process.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tests.runs import tvq_command
from tests.test_pipeline import copy_repo, snakemake
from tvq.report import ReportError
from tvq.report.reading import read_csv, read_json_object
from tvq.report.results import load_result, load_results
from tvq.report.throughput import (
    SPEEDUP_COLUMNS,
    THROUGHPUT_COLUMNS,
    load_speedup,
    load_throughput,
    mfu_table,
)
from tvq.report.training import load_codebook, load_curve, load_run

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "workflow" / "notebooks"
NAN = float("nan")


# --- fixtures: result files in the formats the pipeline writes ---------------------------


def result_record(dataset, split, metric, value, *, canonical=True, partial=False, paper=None):
    split_tokens = 5_000_000
    scored = 4_096 if partial else split_tokens
    record = {
        "dataset": dataset,
        "split": split,
        "metric": metric,
        "value": value,
        "loss_nats_per_token": value * math.log(2),
        "scored_tokens": scored,
        "scored_bytes": scored,
        "scored_words": scored // 6,
        "split_tokens": split_tokens,
        "partial": partial,
        "max_tokens": scored if partial else None,
        "preset": "cpu",
        "param_count": 1_036_288,
        "checkpoint_step": 1_700,
        "checkpoint_val_loss": 1.45,
        "input_sha256": "0" * 64,
        "source_sha256": "1" * 64,
        "canonical": canonical,
        "paper_value": paper,
        "sequence_len": 256,
        "eval_batch_size": 8,
        "device": "1 x cpu",
        "wall_time_s": 12.5,
        "tvq_version": "0.1.0",
    }
    if metric == "word_perplexity":
        record["token_perplexity"] = value / 2
        record["bits_per_byte"] = 1.1
        record["published_words"] = 6_966_499
    return record


def write_results(root: Path) -> list[Path]:
    """Write four result JSONs: canonical, partial, non-canonical, and both flags together."""
    records = {
        "enwik8/validation_bpb.json": result_record(
            "enwik8", "validation", "bits_per_byte", 1.05, partial=True
        ),
        "enwik8/test_bpb.json": result_record(
            "enwik8", "test", "bits_per_byte", 1.02, paper=0.99
        ),
        "pg19/test_ppl.json": result_record(
            "pg19", "test", "word_perplexity", 31.2, canonical=False, paper=26.6
        ),
        "imagenet64/test_bpb.json": result_record(
            "imagenet64", "test", "bits_per_dim", 3.3, canonical=False, partial=True, paper=3.16
        ),
    }
    paths = []
    for name, record in records.items():
        path = root / "results" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        paths.append(path)
    return paths


def codebook_grid(n_layer: int, n_sublayer: int, base: float) -> list[list[float]]:
    return [[round(base + 0.01 * (layer + sub), 4) for sub in range(n_sublayer)]
            for layer in range(n_layer)]


def write_run(folder: Path, *, n_layer: int, n_sublayer: int, n_code: int = 64) -> Path:
    """Write a finished run: metrics.jsonl, both curve CSVs and train_summary.json."""
    folder.mkdir(parents=True, exist_ok=True)
    lines, train_rows, validation_rows = [], [], []
    for step in range(10, 101, 10):
        loss = 5.0 * math.exp(-step / 60) + 1.0
        record = {
            "step": step,
            "kind": "train",
            "loss": loss,
            "ce_loss": loss - 0.01,
            "commit_loss": 0.01,
            "learning_rate": 1e-3 * min(1.0, step / 30),
            "grad_norm": 0.5,
            "tokens_per_s": None if step == 10 else 9000.0,
            "codebook_usage": codebook_grid(n_layer, n_sublayer, 0.5 + step / 400),
            "codebook_perplexity": codebook_grid(n_layer, n_sublayer, n_code * step / 200),
        }
        lines.append(json.dumps(record))
        train_rows.append(record)
        if step % 50 == 0:
            validation = {"step": step, "kind": "validation", "val_loss": loss + 0.1}
            lines.append(json.dumps(validation))
            validation_rows.append(validation)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    # The same views that tvq.train.metrics_log.write_curves writes.
    for name, rows, columns in (
        ("train_curve.csv", train_rows,
         ["step", "loss", "ce_loss", "learning_rate", "grad_norm", "tokens_per_s"]),
        ("validation_curve.csv", validation_rows, ["step", "val_loss"]),
    ):
        with (folder / name).open("w", newline="") as file:
            writer = csv.DictWriter(file, columns, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    summary = {
        "step": 100, "n_max_step": 100, "preset": "cpu", "param_count": 1_036_288,
        "best_step": 100, "best_val_loss": validation_rows[-1]["val_loss"],
        "resumed_from": None, "steps_this_run": 100, "tokens_per_s": 9000.0,
        "wall_time_s": 600.0, "tvq_version": "0.1.0",
    }
    (folder / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return folder


def throughput_row(head_type, attn_type, sequence_len, status="ok", dtype="float32"):
    timed = status in ("ok", "over budget")
    # Made-up but self-consistent figures: full slows down with length, vq barely.
    if attn_type == "vq":
        tokens_per_s = 20_000.0 * (1 - 0.05 * math.log2(sequence_len / 2048))
        gflop_per_token = 1.2
    else:
        tokens_per_s = 40_000.0 * 2048 / sequence_len
        gflop_per_token = 0.9 + 0.3 * sequence_len / 2048
    step_s = sequence_len / tokens_per_s
    return {
        "preset": "tiny", "backend": "cpu", "device": "cpu", "dtype": dtype, "n_layer": 1,
        "d_model": 128, "batch_size": 1, "sequence_len": sequence_len,
        "head_type": head_type, "attn_type": attn_type, "status": status,
        "compile_s": 2.0 if status != "out of memory" else NAN,
        "step_s_median": step_s if timed else NAN,
        "step_s_min": step_s if timed else NAN,
        "step_s_max": step_s if timed else NAN,
        "repeats": {"ok": 3, "over budget": 1}.get(status, 0),
        "tokens_per_s": tokens_per_s if timed else NAN,
        "train_gflop_per_token": gflop_per_token,
        "gflop_per_s": tokens_per_s * gflop_per_token if timed else NAN,
        "peak_memory_gib": 0.5 if timed else NAN,
        "matmul_gflop_per_s": 100_000.0,
        "mfu": tokens_per_s * gflop_per_token / 100_000.0 if timed else NAN,
    }


def write_throughput(root: Path) -> tuple[Path, Path]:
    """Write throughput.csv and speedup.csv, including rows that ran out of memory,
    failed, or ran over budget with one timed step."""
    statuses = {
        ("shga", "full", 32768): "out of memory",
        ("mqa", "full", 32768): "over budget",
    }
    rows = [
        throughput_row(head, attn, length, statuses.get((head, attn, length), "ok"))
        for head in ("shga", "mqa")
        for length in (2048, 8192, 32768)
        for attn in ("vq", "full")
    ]
    rows.append(throughput_row(
        "shga", "vq", 2048, "failed: XlaRuntimeError: INTERNAL: bfloat16, unsupported",
        dtype="bfloat16",
    ))

    speedups = []
    for row in rows:
        if row["attn_type"] != "vq":
            continue
        full = next(
            (r for r in rows if r["attn_type"] == "full" and r["dtype"] == row["dtype"]
             and r["head_type"] == row["head_type"]
             and r["sequence_len"] == row["sequence_len"]),
            None,
        )
        full_tokens = full["tokens_per_s"] if full else NAN
        flop_ratio = (
            full["train_gflop_per_token"] / row["train_gflop_per_token"] if full else NAN
        )
        speedup = row["tokens_per_s"] / full_tokens
        shortest = next(
            r for r in rows if r["attn_type"] == "vq" and r["dtype"] == row["dtype"]
            and r["head_type"] == row["head_type"]
        )
        speedups.append({
            "preset": "tiny", "dtype": row["dtype"], "head_type": row["head_type"],
            "sequence_len": row["sequence_len"], "vq_tokens_per_s": row["tokens_per_s"],
            "full_tokens_per_s": full_tokens,
            "full_status": full["status"] if full else "not run",
            "speedup": speedup, "flop_ratio": flop_ratio,
            "speedup_of_flop_ratio": speedup / flop_ratio,
            "vq_of_shortest": row["tokens_per_s"] / shortest["tokens_per_s"],
        })

    folder = root / "results" / "throughput"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records, columns in (
        ("throughput.csv", rows, list(THROUGHPUT_COLUMNS)),
        ("speedup.csv", speedups, list(SPEEDUP_COLUMNS)),
    ):
        path = folder / name
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
        paths.append(path)
    return paths[0], paths[1]


# --- running `tvq report` --------------------------------------------------------------


def run_report(cwd: Path, notebook: str, *settings: str, env=None) -> subprocess.CompletedProcess:
    """Run `tvq report` on a repository notebook with outputs under cwd/out."""
    command = tvq_command(
        "report", NOTEBOOKS / f"{notebook}.ipynb", "--out", f"out/{notebook}.ipynb",
        *(part for setting in settings for part in ("--set", setting)),
    )
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=300,
        env=env or dict(os.environ),
    )


def json_list(paths) -> str:
    return json.dumps([str(path) for path in paths])


def assert_rendered(cwd: Path, notebook: str, figures: list[str]) -> str:
    """Check the executed notebook, its HTML and figures; return the HTML."""
    executed = cwd / "out" / f"{notebook}.ipynb"
    html = cwd / "out" / f"{notebook}.html"
    for path in [executed, html, *(cwd / "figures" / name for name in figures)]:
        assert path.is_file(), f"{path} missing"
        assert path.stat().st_size > 0, f"{path} is empty"
    document = nbformat.read(executed, as_version=4)
    nbformat.validate(document)
    errors = [
        output for cell in document.cells if cell.cell_type == "code"
        for output in cell.outputs if output.output_type == "error"
    ]
    assert errors == []
    for name in figures:
        assert (cwd / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return html.read_text()


def assert_nothing_written(cwd: Path) -> None:
    """Check that a failed render left no output, staging folder or figure."""
    out = cwd / "out"
    leftovers = sorted(path.name for path in out.iterdir()) if out.exists() else []
    assert leftovers == []
    figures = cwd / "figures"
    assert not figures.exists() or sorted(p.name for p in figures.iterdir()) == []


def test_results_notebook_renders(tmp_path):
    write_results(tmp_path)
    files = sorted((tmp_path / "results").rglob("*.json"))
    completed = run_report(
        tmp_path, "results",
        f"result_files={json_list(path.relative_to(tmp_path) for path in files)}",
        "figures_dir=figures",
    )
    assert completed.returncode == 0, completed.stderr
    html = assert_rendered(tmp_path, "results", ["results.png"])
    assert "non-canonical input" in html
    assert "partial: 4,096 of 5,000,000 tokens" in html
    assert "Not comparable with the paper" in html
    assert "wrote out/results.ipynb, out/results.html" in completed.stdout


def test_throughput_notebook_renders(tmp_path):
    throughput, speedup = write_throughput(tmp_path)
    completed = run_report(
        tmp_path, "throughput", f"throughput_csv={throughput}", f"speedup_csv={speedup}",
        "figures_dir=figures",
    )
    assert completed.returncode == 0, completed.stderr
    html = assert_rendered(tmp_path, "throughput", ["throughput.png", "speedup.png"])
    assert "out of memory" in html
    assert "over budget" in html
    assert "failed: XlaRuntimeError" in html


def test_training_notebook_renders(tmp_path):
    shga = write_run(tmp_path / "runs" / "enwik8" / "cpu", n_layer=2, n_sublayer=2)
    mqa = write_run(tmp_path / "runs" / "pg19" / "cpu", n_layer=3, n_sublayer=1)
    runs = json.dumps({"enwik8": str(shga), "pg19": str(mqa)})
    completed = run_report(tmp_path, "training", f"run_dirs={runs}", "figures_dir=figures")
    assert completed.returncode == 0, completed.stderr
    assert_rendered(tmp_path, "training", ["training_curves.png", "codebook_usage.png"])


def test_truncated_result_fails_naming_file(tmp_path):
    paths = write_results(tmp_path)
    broken = paths[1]
    broken.write_text(broken.read_text()[:200])
    # A figure from an earlier render must survive the failed one unchanged.
    (tmp_path / "figures").mkdir()
    earlier = tmp_path / "figures" / "results.png"
    earlier.write_bytes(b"earlier")

    completed = run_report(
        tmp_path, "results", f"result_files={json_list(paths)}", "figures_dir=figures"
    )
    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("tvq report: error: ")
    assert f"{broken}: not valid JSON at line" in lines[0]
    assert "raised ReportError: " in lines[0]
    assert earlier.read_bytes() == b"earlier"
    earlier.unlink()
    assert_nothing_written(tmp_path)


def test_csv_missing_column_fails_naming_file(tmp_path):
    throughput, speedup = write_throughput(tmp_path)
    with throughput.open() as file:
        rows = list(csv.reader(file))
    status = rows[0].index("status")
    throughput.write_text("\n".join(",".join(r[:status] + r[status + 1:]) for r in rows) + "\n")

    completed = run_report(
        tmp_path, "throughput", f"throughput_csv={throughput}", f"speedup_csv={speedup}",
        "figures_dir=figures",
    )
    assert completed.returncode == 1
    assert f"{throughput}: missing column 'status'" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert_nothing_written(tmp_path)


def test_failure_after_figure_keeps_no_figure(tmp_path):
    # A notebook that saves a figure and then fails: the staged figure must not appear.
    notebook = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('figures_dir = "figures"')
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [
        parameters,
        nbformat.v4.new_code_cell(
            "import matplotlib.pyplot as plt\n"
            "from tvq.report.figures import save_figure\n"
            "figure, ax = plt.subplots()\n"
            "ax.plot([1, 2], [3, 4])\n"
            "save_figure(figure, figures_dir, 'early.png')"
        ),
        nbformat.v4.new_code_cell("raise ValueError('stopped after the figure')"),
    ]
    notebook.metadata["kernelspec"] = {"name": "python3", "language": "python",
                                       "display_name": "Python 3"}
    path = tmp_path / "two_cells.ipynb"
    nbformat.write(notebook, path)

    completed = subprocess.run(
        tvq_command("report", path, "--out", "out/two_cells.ipynb"),
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 1
    assert "cell In [3] raised ValueError: stopped after the figure" in completed.stderr
    assert_nothing_written(tmp_path)


def test_dead_kernel_fails_with_its_output(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(
        "import os, sys\nprint('exiting now', file=sys.__stderr__, flush=True)\nos._exit(3)"
    )]
    notebook.metadata["kernelspec"] = {"name": "python3", "language": "python",
                                       "display_name": "Python 3"}
    path = tmp_path / "dies.ipynb"
    nbformat.write(notebook, path)

    completed = subprocess.run(
        tvq_command("report", path, "--out", "out/dies.ipynb"),
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        f"tvq report: error: {path}: the kernel died (Kernel died); the kernel's last "
        "output: exiting now"
    ]
    assert_nothing_written(tmp_path)


def test_kernel_is_this_python_despite_kernelspec(tmp_path):
    # A "python3" kernelspec first on JUPYTER_PATH that points at no real interpreter:
    # jupyter_client's own lookup would pick it, tvq report must not.
    kernel_dir = tmp_path / "jupyter" / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [str(tmp_path / "no-such-python"), "-m", "ipykernel_launcher",
                 "-f", "{connection_file}"],
        "display_name": "Broken", "language": "python",
    }))
    notebook = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('out = "executable.txt"')
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [
        parameters,
        nbformat.v4.new_code_cell(
            "import sys, pathlib\npathlib.Path(out).write_text(sys.executable)"
        ),
    ]
    notebook.metadata["kernelspec"] = {"name": "python3", "language": "python",
                                       "display_name": "Python 3"}
    path = tmp_path / "executable.ipynb"
    nbformat.write(notebook, path)

    env = {**os.environ, "JUPYTER_PATH": str(tmp_path / "jupyter")}
    completed = subprocess.run(
        tvq_command("report", path, "--out", "out/executable.ipynb"),
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "executable.txt").read_text() == sys.executable


def test_unknown_parameter_is_rejected(tmp_path):
    completed = subprocess.run(
        tvq_command(
            "report", NOTEBOOKS / "results.ipynb", "--out", "out/results.ipynb",
            "--set", "result_file=[a.json]",
        ),
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 2
    assert "has no parameter 'result_file'" in completed.stderr
    assert "result_files, figures_dir" in completed.stderr
    assert not (tmp_path / "out").exists()


def test_out_must_be_ipynb(tmp_path):
    completed = subprocess.run(
        tvq_command("report", NOTEBOOKS / "results.ipynb", "--out", "out/results.html"),
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 2
    assert "must end in .ipynb" in completed.stderr


def test_report_help_lists_options():
    completed = subprocess.run(
        tvq_command("report", "--help"), capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0
    for option in ("--out", "--html", "--set", "notebook"):
        assert option in completed.stdout


@pytest.mark.parametrize("name", ["results", "throughput", "training"])
def test_notebook_has_parameters_cell(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert "figures_dir" in tagged[0].source
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


# --- loaders ---------------------------------------------------------------------------


def test_results_load_with_caveats(tmp_path):
    results = load_results(write_results(tmp_path))
    caveats = dict(zip(results["dataset"] + " " + results["split"], results["caveats"],
                       strict=True))
    assert caveats["enwik8 test"] == ""
    assert caveats["enwik8 validation"] == "partial: 4,096 of 5,000,000 tokens"
    assert caveats["pg19 test"] == "non-canonical input"
    assert caveats["imagenet64 test"] == (
        "non-canonical input; partial: 4,096 of 5,000,000 tokens"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"value": None}, "field 'value' must be a finite number, got null"),
        ({"canonical": "yes"}, "field 'canonical' must be true or false, got \"yes\""),
        ({"split": "train"}, "split must be one of validation, test, got 'train'"),
        ({"metric": "accuracy"}, "metric must be one of"),
        ({"paper_value": "0.99"}, "field 'paper_value' must be a finite number or null"),
        ({"scored_tokens": 0}, "scored_tokens 0 must be between 1 and split_tokens"),
    ],
)
def test_result_field_errors(tmp_path, change, message):
    path = tmp_path / "test_bpb.json"
    path.write_text(json.dumps({**result_record("enwik8", "test", "bits_per_byte", 1.0),
                                **change}))
    with pytest.raises(ReportError, match="^" + str(path).replace("\\", "\\\\")) as raised:
        load_result(path)
    assert message in str(raised.value)


def test_result_missing_field(tmp_path):
    record = result_record("enwik8", "test", "bits_per_byte", 1.0)
    del record["value"]
    path = tmp_path / "test_bpb.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ReportError) as raised:
        load_result(path)
    assert str(raised.value) == f"{path}: missing field 'value'"


def test_result_missing_file(tmp_path):
    with pytest.raises(ReportError) as raised:
        load_result(tmp_path / "absent.json")
    assert str(raised.value) == f"{tmp_path / 'absent.json'}: not found"


def test_result_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ReportError, match="expected a JSON object, got list"):
        read_json_object(path)


def test_repeated_dataset_split_rejected(tmp_path):
    paths = write_results(tmp_path)
    copy = tmp_path / "copy.json"
    copy.write_text(paths[1].read_text())
    with pytest.raises(ReportError, match="enwik8 test is also the result in"):
        load_results([paths[1], copy])


def test_throughput_loads_with_unsuccessful_rows(tmp_path):
    throughput_path, speedup_path = write_throughput(tmp_path)
    throughput = load_throughput(throughput_path)
    statuses = set(throughput["status"])
    assert {"ok", "over budget", "out of memory"} <= statuses
    assert throughput["timed"].sum() == len(throughput) - 2
    speedup = load_speedup(speedup_path)
    oom = speedup[(speedup["head_type"] == "shga") & (speedup["sequence_len"] == 32768)
                  & (speedup["dtype"] == "float32")]
    assert math.isnan(oom["speedup"].iloc[0])
    table = mfu_table(throughput)
    assert table.loc[("float32", "shga", "full"), 32768] == "out of memory"
    assert table.loc[("bfloat16", "shga", "vq"), 2048] == "failed"
    assert table.loc[("bfloat16", "shga", "vq"), 8192] == "not run"
    assert table.loc[("float32", "mqa", "full"), 32768].endswith("(over budget)")


def rewrite_cell(path: Path, row: int, column: str, value: str) -> None:
    with path.open() as file:
        rows = list(csv.reader(file))
    rows[row][rows[0].index(column)] = value
    with path.open("w", newline="") as file:
        csv.writer(file, lineterminator="\n").writerows(rows)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("status", "crashed", "line 2: 'status' must be ok, over budget, out of memory"),
        ("head_type", "gqa", "line 2: 'head_type' must be shga, mqa, mha, got 'gqa'"),
        ("attn_type", "vq_quadratic", "line 2: 'attn_type' must be vq, full"),
        ("tokens_per_s", "fast", "line 2: 'tokens_per_s' must be a number or nan, got 'fast'"),
        ("tokens_per_s", "nan", "line 2: 'tokens_per_s' must be a finite number, got nan"),
        ("sequence_len", "2048.5", "line 2: 'sequence_len' must be an integer, got '2048.5'"),
        ("sequence_len", "8192", "line 4 repeats the preset, dtype, head_type"),
    ],
)
def test_throughput_value_errors(tmp_path, column, value, message):
    path, _ = write_throughput(tmp_path)
    rewrite_cell(path, 1, column, value)
    with pytest.raises(ReportError) as raised:
        load_throughput(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


def test_csv_short_row_and_empty_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n3\n")
    with pytest.raises(ReportError, match="line 3 has 1 fields, the header has 2"):
        read_csv(path, {"a": "integer", "b": "integer"})
    path.write_text("a,b\n1,2,3,4\n")
    with pytest.raises(ReportError, match="line 2 has 4 fields, the header has 2"):
        read_csv(path, {"a": "integer", "b": "integer"})
    path.write_text("a,b\n1,2\n\n3,x\n")
    with pytest.raises(ReportError, match="line 4: 'b' must be an integer, got 'x'"):
        read_csv(path, {"a": "integer", "b": "integer"})
    path.write_text("a,a\n1,2\n")
    with pytest.raises(ReportError, match="the header repeats 'a'"):
        read_csv(path, {"a": "integer"})
    path.write_text("")
    with pytest.raises(ReportError, match="empty; expected a header line with the columns a, b"):
        read_csv(path, {"a": "integer", "b": "integer"})


def test_speedup_rejects_unknown_full_status(tmp_path):
    _, path = write_throughput(tmp_path)
    rewrite_cell(path, 1, "full_status", "skipped")
    with pytest.raises(ReportError, match="'full_status' must be ok, over budget"):
        load_speedup(path)


def test_run_loads_codebook_per_layer(tmp_path):
    run = load_run("enwik8", write_run(tmp_path / "run", n_layer=2, n_sublayer=2))
    assert len(run.train) == 10
    assert list(run.validation["step"]) == [50, 100]
    assert len(run.codebook) == 10 * 2 * 2
    assert set(run.codebook["attention"]) == {"0.0", "0.1", "1.0", "1.1"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{\"step\": 5, \"kind\": \"train\"", "line 1 is not valid JSON"),
        ("[1, 2]", "line 1 is not a JSON object"),
        ("{\"step\": 5, \"kind\": \"eval\"}", "line 1: kind must be one of train, validation"),
        ("{\"step\": 5, \"kind\": \"validation\"}", "line 1: missing field 'val_loss'"),
        (
            "{\"step\": 5, \"kind\": \"train\", \"loss\": 1.0, \"learning_rate\": 0.1, "
            "\"codebook_usage\": [0.5], \"codebook_perplexity\": [[3.0]]}",
            "line 1: codebook_usage must be a list over layers of lists of finite numbers",
        ),
    ],
)
def test_metrics_line_errors(tmp_path, line, message):
    path = write_run(tmp_path / "run", n_layer=1, n_sublayer=1) / "metrics.jsonl"
    path.write_text(line + "\n" + path.read_text())
    with pytest.raises(ReportError) as raised:
        load_codebook(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


def test_metrics_codebook_shape_change_rejected(tmp_path):
    path = write_run(tmp_path / "run", n_layer=2, n_sublayer=1) / "metrics.jsonl"
    record = json.loads(path.read_text().splitlines()[0])
    record["codebook_usage"] = codebook_grid(3, 1, 0.5)
    record["codebook_perplexity"] = codebook_grid(3, 1, 5.0)
    path.write_text(path.read_text() + json.dumps(record) + "\n")
    with pytest.raises(ReportError, match="codebook_usage has 3 layers of 1/1/1 sublayers, "
                                          "earlier lines have 2 layers of 1/1 sublayers"):
        load_codebook(path)


def test_curve_without_rows_rejected(tmp_path):
    folder = write_run(tmp_path / "run", n_layer=1, n_sublayer=1)
    (folder / "validation_curve.csv").write_text("step,val_loss\n")
    with pytest.raises(ReportError, match="no rows after the header"):
        load_curve(folder / "validation_curve.csv")
    (folder / "train_curve.csv").write_text(
        "step,loss,ce_loss,learning_rate,grad_norm,tokens_per_s\n10,nan,1,0.1,1,\n"
    )
    with pytest.raises(ReportError, match="line 2: 'loss' must be a finite number, got nan"):
        load_curve(folder / "train_curve.csv")


def test_summary_missing_field_rejected(tmp_path):
    folder = write_run(tmp_path / "run", n_layer=1, n_sublayer=1)
    summary = json.loads((folder / "train_summary.json").read_text())
    del summary["best_val_loss"]
    (folder / "train_summary.json").write_text(json.dumps(summary))
    with pytest.raises(ReportError) as raised:
        load_run("run", folder)
    assert str(raised.value) == f"{folder / 'train_summary.json'}: missing field 'best_val_loss'"


# --- pipeline --------------------------------------------------------------------------

REPORT_OUTPUTS = [
    f"results/notebooks/{name}.{suffix}"
    for name in ("results", "throughput", "training") for suffix in ("ipynb", "html")
] + [
    f"results/figures/{name}.png"
    for name in ("results", "throughput", "speedup", "training_curves", "codebook_usage")
]


def test_report_target_dry_run(tmp_path):
    root = copy_repo(tmp_path / "repo")
    planned = snakemake(
        root, "-n", "-p", "report", "--config", "preset=smoke", "datasets=[enwik8, pg19]"
    )
    assert planned.returncode == 0, planned.stdout
    for rule in ("report_results", "report_throughput", "report_training", "throughput"):
        assert re.search(rf"^{rule}\s+1$", planned.stdout, flags=re.MULTILINE), rule
    for output in REPORT_OUTPUTS:
        assert output in planned.stdout, output
    for path in (
        "results/enwik8/test_bpb.json", "results/pg19/test_ppl.json",
        "runs/pg19/smoke/validation_curve.csv", "results/throughput/speedup.csv",
    ):
        assert path in planned.stdout, path
    assert "\"pg19\": \"runs/pg19/smoke\"" in planned.stdout


@pytest.mark.slow
def test_report_target_renders_from_result_files(tmp_path):
    root = copy_repo(tmp_path / "repo")
    write_results(root)
    write_throughput(root)
    write_run(root / "runs" / "enwik8" / "cpu", n_layer=2, n_sublayer=2)
    # Only the report rules may run, so the fixture files stand in for the pipeline's.
    completed = snakemake(
        root, "--cores", "1", "report", "--config", "datasets=[enwik8]",
        "--allowed-rules", "report", "report_results", "report_throughput", "report_training",
    )
    assert completed.returncode == 0, completed.stdout
    for output in REPORT_OUTPUTS:
        assert (root / output).stat().st_size > 0, output
    for name in ("results", "throughput", "training"):
        assert (root / "logs" / "report" / f"{name}.log").is_file()
        assert (root / "benchmarks" / "report" / f"{name}.tsv").is_file()


def test_report_rejects_same_out_and_html(tmp_path):
    command = tvq_command(
        "report", NOTEBOOKS / "throughput.ipynb", "--out", "same.ipynb", "--html", "same.ipynb",
    )
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert completed.returncode == 2
    assert "name the same file" in completed.stderr
    assert not (tmp_path / "same.ipynb").exists()


def test_throughput_notebook_renders_untimed_rows(tmp_path):
    # Every configuration out of memory: nothing to put on a log axis, still a figure.
    from tvq.bench.throughput import COLUMNS, SPEEDUP_COLUMNS

    untimed = {column: "nan" for column in COLUMNS}
    rows = [
        {**untimed, "preset": "cpu", "backend": "cpu", "device": "cpu", "dtype": "float32",
         "n_layer": "1", "d_model": "768", "batch_size": "1", "sequence_len": "131072",
         "head_type": "shga", "attn_type": attn, "status": "out of memory", "repeats": "0",
         "memory_source": "compiled", "mfu_reference": "matmul"}
        for attn in ("vq", "full")
    ]
    speedup = [{
        **{column: "nan" for column in SPEEDUP_COLUMNS}, "preset": "cpu", "dtype": "float32",
        "head_type": "shga", "sequence_len": "131072", "full_status": "out of memory",
    }]
    for name, columns, records in (
        ("throughput.csv", COLUMNS, rows), ("speedup.csv", SPEEDUP_COLUMNS, speedup)
    ):
        with (tmp_path / name).open("w", newline="") as file:
            writer = csv.DictWriter(file, columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)

    completed = run_report(
        tmp_path, "throughput", "throughput_csv=throughput.csv", "speedup_csv=speedup.csv",
        "figures_dir=figures",
    )
    assert completed.returncode == 0, completed.stderr
    assert_rendered(tmp_path, "throughput", ["throughput.png", "speedup.png"])
