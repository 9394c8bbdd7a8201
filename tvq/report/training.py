"""Training runs: the curves, metrics.jsonl and train_summary.json that `tvq train` writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tvq.report.errors import ReportError
from tvq.report.reading import (
    check_fields,
    check_finite,
    is_finite_number,
    read_csv,
    read_json_lines,
    read_json_object,
)
from tvq.train.metrics_log import CURVES, METRICS_FILE

# Written last by `tvq train` (tvq/train/loop.py), when the run reached n_max_step.
SUMMARY_FILE = "train_summary.json"
SUMMARY_FIELDS = {
    "step": "integer",
    "n_max_step": "integer",
    "preset": "text",
    "param_count": "integer",
    "best_step": "integer?",
    "best_val_loss": "number?",
    "tokens_per_s": "number?",
    "wall_time_s": "number",
}
# Columns of the curve CSVs that must be finite in every row; tokens_per_s may be empty.
FINITE_CURVE_COLUMNS = {
    "train_curve.csv": ["loss", "learning_rate"],
    "validation_curve.csv": ["val_loss"],
}
# Per-layer codebook figures of the "train" lines of metrics.jsonl, each a list over
# layers of a list over the layer's attention sublayers (two for shga, else one).
CODEBOOK_FIELDS = ("codebook_usage", "codebook_perplexity")
RECORD_KINDS = ("train", "validation")


@dataclass
class TrainingRun:
    """One run folder's training history, as data frames."""

    name: str
    directory: Path
    summary: dict[str, Any]
    # Columns of train_curve.csv: step, loss, ce_loss, learning_rate, grad_norm, tokens_per_s.
    train: pd.DataFrame
    # Columns of validation_curve.csv: step, val_loss.
    validation: pd.DataFrame
    # One row per train record and attention sublayer: step, layer, sublayer, attention
    # (a "layer.sublayer" label), usage (fraction of codes chosen in the batch) and
    # perplexity (exp of the entropy of the batch's code frequencies).
    codebook: pd.DataFrame


def load_run(name: str, directory: str | Path) -> TrainingRun:
    """Read a finished run folder: its summary, both curve CSVs and metrics.jsonl."""
    directory = Path(directory)
    summary_path = directory / SUMMARY_FILE
    summary = read_json_object(summary_path)
    check_fields(summary, SUMMARY_FIELDS, str(summary_path))
    train = load_curve(directory / "train_curve.csv")
    validation = load_curve(directory / "validation_curve.csv")
    codebook = load_codebook(directory / METRICS_FILE)
    return TrainingRun(name, directory, summary, train, validation, codebook)


def load_curve(path: str | Path) -> pd.DataFrame:
    """Read train_curve.csv or validation_curve.csv, which must have at least one row."""
    path = Path(path)
    if path.name not in CURVES:
        raise ValueError(f"{path.name} is not one of the curve files {', '.join(CURVES)}")
    _, columns = CURVES[path.name]
    kinds = {column: "integer" if column == "step" else "number" for column in columns}
    frame = read_csv(path, kinds)
    if frame.empty:
        raise ReportError(f"{path}: no rows after the header; the run logged no steps")
    check_finite(frame, path, FINITE_CURVE_COLUMNS[path.name])
    return frame


def load_codebook(path: str | Path) -> pd.DataFrame:
    """Read the per-layer codebook usage and perplexity of every train line of metrics.jsonl."""
    path = Path(path)
    rows = []
    shape = None
    for number, record in read_json_lines(path):
        where = f"{path}: line {number}"
        check_fields(record, {"step": "integer", "kind": "text"}, where)
        if record["kind"] not in RECORD_KINDS:
            raise ReportError(
                f"{where}: kind must be one of {', '.join(RECORD_KINDS)}, got {record['kind']!r}"
            )
        if record["kind"] == "validation":
            check_fields(record, {"val_loss": "number"}, where)
            continue
        check_fields(record, {"loss": "number", "learning_rate": "number"}, where)
        usage = _layer_grid(record, "codebook_usage", where)
        perplexity = _layer_grid(record, "codebook_perplexity", where)
        if shape is None:
            shape = _grid_shape(usage)
        for name, grid in (("codebook_usage", usage), ("codebook_perplexity", perplexity)):
            if _grid_shape(grid) != shape:
                raise ReportError(
                    f"{where}: {name} has {_describe_shape(_grid_shape(grid))}, earlier lines "
                    f"have {_describe_shape(shape)}"
                )
        for layer, sublayers in enumerate(usage):
            for sublayer, value in enumerate(sublayers):
                rows.append(
                    {
                        "step": record["step"],
                        "layer": layer,
                        "sublayer": sublayer,
                        "attention": f"{layer}.{sublayer}",
                        "usage": value,
                        "perplexity": perplexity[layer][sublayer],
                    }
                )
    if not rows:
        raise ReportError(f"{path}: no train lines; the run logged no steps")
    return pd.DataFrame(rows)


def _layer_grid(record: dict[str, Any], name: str, where: str) -> list[list[float]]:
    """Return record[name] after checking that it is a non-empty list of lists of numbers."""
    if name not in record:
        raise ReportError(f"{where}: missing field {name!r}")
    grid = record[name]
    valid = (
        isinstance(grid, list)
        and grid
        and all(isinstance(row, list) and row for row in grid)
        and all(is_finite_number(value) for row in grid for value in row)
    )
    if not valid:
        raise ReportError(
            f"{where}: {name} must be a list over layers of lists of finite numbers, got {grid!r}"
        )
    return grid


def _grid_shape(grid: list[list[float]]) -> tuple[int, ...]:
    return tuple(len(row) for row in grid)


def _describe_shape(shape: tuple[int, ...]) -> str:
    return f"{len(shape)} layers of {'/'.join(str(n) for n in shape)} sublayers"


def summary_table(runs: list[TrainingRun]) -> pd.DataFrame:
    """Return one row per run with its length, size, speed and best validation loss."""
    rows = []
    for run in runs:
        s = run.summary
        rows.append(
            {
                "run": run.name,
                "folder": str(run.directory),
                "preset": s["preset"],
                "steps": f"{s['step']:,} of {s['n_max_step']:,}",
                "parameters": f"{s['param_count']:,}",
                "best step": s["best_step"],
                "best validation loss (nats/token)": s["best_val_loss"],
                "tokens/s": s["tokens_per_s"],
                "wall time (min)": s["wall_time_s"] / 60,
            }
        )
    return pd.DataFrame(rows)
