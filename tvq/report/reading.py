"""Readers for JSON, JSON-lines and CSV result files that raise ReportError naming the file."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tvq.report.errors import ReportError


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# Kinds of JSON field: the description used in messages, and the test of a decoded value.
# A kind written with a trailing "?" (such as "number?") also accepts null.
FIELD_KINDS = {
    "text": ("a string", lambda value: isinstance(value, str)),
    "integer": (
        "an integer", lambda value: isinstance(value, int) and not isinstance(value, bool)
    ),
    "number": ("a finite number", is_finite_number),
    "boolean": ("true or false", lambda value: isinstance(value, bool)),
}

# Kinds of CSV column. "number" cells may be empty or "nan" (how Python's csv module and
# tvq write a missing number); they become NaN.
COLUMN_KINDS = ("text", "integer", "number")

def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: not found") from None
    except UnicodeDecodeError as error:
        raise ReportError(
            f"{path}: not UTF-8 text (invalid byte at offset {error.start})"
        ) from None
    except OSError as error:
        raise ReportError(f"{path}: cannot be read ({error.strerror or error})") from None


def read_json(path: str | Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ReportError(
            f"{path}: not valid JSON at line {error.lineno}, column {error.colno} ({error.msg})"
        ) from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    value = read_json(path)
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_json_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Return (line number, object) for each non-blank line of a JSON-lines file."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportError(
                f"{path}: line {number} is not valid JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}: line {number} is not a JSON object")
        records.append((number, record))
    return records


def check_fields(record: dict[str, Any], fields: dict[str, str], where: str) -> None:
    """Raise ReportError unless record has every field in `fields` with a value of its kind.

    `fields` maps a field name to a key of FIELD_KINDS, optionally followed by "?".
    `where` starts the message, such as the file path or "PATH: line 3".
    """
    for name, kind in fields.items():
        if name not in record:
            raise ReportError(f"{where}: missing field {name!r}")
        value = record[name]
        nullable = kind.endswith("?")
        if value is None and nullable:
            continue
        description, test = FIELD_KINDS[kind.rstrip("?")]
        if not test(value):
            allowed = f"{description} or null" if nullable else description
            raise ReportError(
                f"{where}: field {name!r} must be {allowed}, got {json.dumps(value)}"
            )


def read_csv(path: str | Path, columns: dict[str, str]) -> pd.DataFrame:
    """Read a CSV file with a header line that names at least the given columns.

    `columns` maps each required column to a kind in COLUMN_KINDS. Integer columns become
    int64 and number columns float64; other columns stay strings. The frame's index,
    named "line", is each row's line number in the file (the header is line 1), which
    every message about a row gives. Blank lines are skipped.
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text(path)))
    rows, lines = [], []
    try:
        header = next(reader, None)
        if header is None:
            raise ReportError(
                f"{path}: empty; expected a header line with the columns {', '.join(columns)}"
            )
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ReportError(
                    f"{path}: line {reader.line_num} has {len(row)} fields, the header has "
                    f"{len(header)}"
                )
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as error:
        raise ReportError(f"{path}: not valid CSV at line {reader.line_num} ({error})") from None

    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ReportError(f"{path}: the header repeats {', '.join(map(repr, repeated))}")
    missing = [column for column in columns if column not in header]
    if missing:
        names = ", ".join(repr(column) for column in missing)
        raise ReportError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {names}")

    frame = pd.DataFrame(rows, columns=header, index=pd.Index(lines, name="line"), dtype=str)
    for column, kind in columns.items():
        if kind == "integer":
            frame[column] = _integer_column(path, frame[column], column)
        elif kind == "number":
            frame[column] = _number_column(path, frame[column], column)
        elif kind != "text":
            raise ValueError(f"unknown column kind {kind!r}; expected one of {COLUMN_KINDS}")
    return frame


def _integer_column(path: Path, cells: pd.Series, column: str) -> pd.Series:
    valid = cells.str.fullmatch(r"\s*-?\d+\s*").astype(bool)
    if not valid.all():
        line = cells.index[int((~valid).to_numpy().nonzero()[0][0])]
        raise ReportError(
            f"{path}: line {line}: {column!r} must be an integer, got {cells[line]!r}"
        )
    return cells.astype("int64")


def _number_column(path: Path, cells: pd.Series, column: str) -> pd.Series:
    stripped = cells.str.strip()
    missing = (stripped == "") | (stripped.str.lower() == "nan")
    values = pd.to_numeric(stripped.where(~missing, "nan"), errors="coerce")
    invalid = values.isna() & ~missing
    if invalid.any():
        line = cells.index[int(invalid.to_numpy().nonzero()[0][0])]
        raise ReportError(
            f"{path}: line {line}: {column!r} must be a number or nan, got {cells[line]!r}"
        )
    return values.astype("float64")


def check_finite(
    frame: pd.DataFrame, path: str | Path, columns: Iterable[str], rows: pd.Series | None = None
) -> None:
    """Raise ReportError if a number column is NaN or infinite in any (selected) row.

    frame comes from read_csv, so its index contains the line numbers.
    """
    selected = frame if rows is None else frame[rows]
    for column in columns:
        values = selected[column].to_numpy(dtype="float64")
        bad = ~np.isfinite(values)
        if bad.any():
            line = selected.index[int(bad.nonzero()[0][0])]
            raise ReportError(
                f"{path}: line {line}: {column!r} must be a finite number, got "
                f"{selected.at[line, column]}"
            )
