"""Throughput tables: throughput.csv and speedup.csv from `tvq bench throughput`."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from tvq.model.config import HEAD_TYPES
from tvq.report.errors import ReportError
from tvq.report.reading import check_finite, read_csv

# One row per configuration. Number columns contain "nan" where a configuration has no
# figure, such as every timing of a row that ran out of memory.
THROUGHPUT_COLUMNS = {
    "preset": "text",
    "backend": "text",
    "device": "text",
    "dtype": "text",
    "n_layer": "integer",
    "d_model": "integer",
    "batch_size": "integer",
    "sequence_len": "integer",
    "head_type": "text",
    "attn_type": "text",
    "status": "text",
    "compile_s": "number",
    "step_s_median": "number",
    "step_s_min": "number",
    "step_s_max": "number",
    "repeats": "integer",
    "tokens_per_s": "number",
    "train_gflop_per_token": "number",
    "gflop_per_s": "number",
    "peak_memory_gib": "number",
    "matmul_gflop_per_s": "number",
    "mfu": "number",
}
# One row per vq configuration. speedup is vq over full tokens per second, nan where
# either has no timing. flop_ratio is full over vq analytic training FLOPs per token.
# vq_of_shortest is vq's tokens per second relative to the shortest length of the same
# dtype and head type.
SPEEDUP_COLUMNS = {
    "preset": "text",
    "dtype": "text",
    "head_type": "text",
    "sequence_len": "integer",
    "vq_tokens_per_s": "number",
    "full_tokens_per_s": "number",
    "full_status": "text",
    "speedup": "number",
    "flop_ratio": "number",
    "speedup_of_flop_ratio": "number",
    "vq_of_shortest": "number",
}
ATTN_TYPES = ("vq", "full")
STATUSES = ("ok", "over budget", "out of memory")
FAILED_PREFIX = "failed: "
# full_status of a vq row whose full configuration was not in the run.
NOT_RUN = "not run"

# The Transformer-VQ paper's claims (Lingle, ICLR 2024) for VQ against quadratic
# attention: over 3x the training throughput at T = 8192 and over 12x at T = 32768.
PAPER_SPEEDUP_CLAIMS = {8192: 3.0, 32768: 12.0}


def is_valid_status(status: str) -> bool:
    if status in STATUSES:
        return True
    return status.startswith(FAILED_PREFIX) and len(status) > len(FAILED_PREFIX)


def short_status(status: str) -> str:
    """Return the status without a failure's message, for figure labels."""
    return "failed" if status.startswith(FAILED_PREFIX) else status


def load_throughput(path: str | Path) -> pd.DataFrame:
    """Read throughput.csv and check its values; ok rows must have finite timings."""
    frame = read_csv(path, THROUGHPUT_COLUMNS)
    if frame.empty:
        raise ReportError(f"{path}: no rows after the header")
    _check_choices(
        frame, path, "status", is_valid_status,
        "ok, over budget, out of memory or failed: <message>",
    )
    _check_choices(frame, path, "head_type", HEAD_TYPES.__contains__, ", ".join(HEAD_TYPES))
    _check_choices(frame, path, "attn_type", ATTN_TYPES.__contains__, ", ".join(ATTN_TYPES))
    check_finite(frame, path, ["step_s_median", "tokens_per_s"], rows=frame["status"] == "ok")

    key = ["preset", "dtype", "head_type", "attn_type", "sequence_len"]
    repeated = frame.duplicated(key, keep="first")
    if repeated.any():
        line = frame.index[int(repeated.to_numpy().nonzero()[0][0])]
        raise ReportError(f"{path}: line {line} repeats the {', '.join(key)} of an earlier line")
    frame["timed"] = frame["tokens_per_s"].notna()
    return frame


def load_speedup(path: str | Path) -> pd.DataFrame:
    """Read speedup.csv and check its values."""
    frame = read_csv(path, SPEEDUP_COLUMNS)
    if frame.empty:
        raise ReportError(f"{path}: no rows after the header")
    _check_choices(
        frame, path, "full_status", lambda status: status == NOT_RUN or is_valid_status(status),
        "ok, over budget, out of memory, failed: <message> or not run",
    )
    _check_choices(frame, path, "head_type", HEAD_TYPES.__contains__, ", ".join(HEAD_TYPES))
    return frame


def _check_choices(frame: pd.DataFrame, path, column: str, is_valid, expected: str) -> None:
    valid = frame[column].map(is_valid).astype(bool)
    if not valid.all():
        line = frame.index[int((~valid).to_numpy().nonzero()[0][0])]
        value = frame.at[line, column]
        raise ReportError(f"{path}: line {line}: {column!r} must be {expected}, got {value!r}")


def mfu_table(throughput: pd.DataFrame) -> pd.DataFrame:
    """Return MFU per configuration, lengths as columns; cells without an MFU show the status."""
    cells = throughput.assign(cell=[_mfu_cell(row) for row in throughput.to_dict("records")])
    table = cells.pivot_table(
        index=["dtype", "head_type", "attn_type"], columns="sequence_len", values="cell",
        aggfunc="first",
    )
    table.columns.name = "sequence length"
    return table.fillna("not run")


def _mfu_cell(row: dict) -> str:
    status = short_status(row["status"])
    if math.isnan(row["mfu"]):
        return status
    if status == "ok":
        return f"{row['mfu']:.1%}"
    return f"{row['mfu']:.1%} ({status})"


def unsuccessful_rows(throughput: pd.DataFrame) -> pd.DataFrame:
    """Return the configurations whose status is not ok, with their full status text.

    The index is the line of throughput.csv.
    """
    columns = ["dtype", "head_type", "attn_type", "sequence_len", "status", "tokens_per_s"]
    return throughput.loc[throughput["status"] != "ok", columns]
