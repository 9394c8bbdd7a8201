"""Evaluation results: the JSON files that `tvq evaluate` writes, as one table.

"The paper" is Transformer-VQ (Lingle, ICLR 2024), whose test figure each result JSON
carries as paper_value.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from tvq.report.errors import ReportError
from tvq.report.reading import check_fields, read_json_object

# Fields of a result JSON that the report uses (tvq/evaluation/evaluate.py writes them).
# paper_value is the Transformer-VQ paper's test figure, null for the validation split.
RESULT_FIELDS = {
    "dataset": "text",
    "split": "text",
    "metric": "text",
    "value": "number",
    "scored_tokens": "integer",
    "split_tokens": "integer",
    "partial": "boolean",
    "canonical": "boolean",
    "preset": "text",
    "checkpoint_step": "integer",
    "paper_value": "number?",
}
SPLITS = ("validation", "test")
METRIC_LABELS = {
    "bits_per_byte": "bits per byte",
    "bits_per_dim": "bits per dimension",
    "word_perplexity": "word-level perplexity",
}


def load_result(path: str | Path) -> dict[str, Any]:
    """Read one result JSON, check the fields that the report uses, and add its path."""
    result = read_json_object(path)
    check_fields(result, RESULT_FIELDS, str(path))
    if result["split"] not in SPLITS:
        raise ReportError(
            f"{path}: split must be one of {', '.join(SPLITS)}, got {result['split']!r}"
        )
    if result["metric"] not in METRIC_LABELS:
        raise ReportError(
            f"{path}: metric must be one of {', '.join(METRIC_LABELS)}, got {result['metric']!r}"
        )
    if not 0 < result["scored_tokens"] <= result["split_tokens"]:
        raise ReportError(
            f"{path}: scored_tokens {result['scored_tokens']} must be between 1 and "
            f"split_tokens {result['split_tokens']}"
        )
    return {**result, "path": str(path)}


def load_results(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Read result JSONs into one row each; raise ReportError on a repeated dataset and split."""
    rows = [load_result(path) for path in paths]
    if not rows:
        raise ReportError("no result files were given")
    seen: dict[tuple[str, str], str] = {}
    for row in rows:
        key = (row["dataset"], row["split"])
        if key in seen:
            raise ReportError(
                f"{row['path']}: {key[0]} {key[1]} is also the result in {seen[key]}; "
                "pass one file per dataset and split"
            )
        seen[key] = row["path"]
    frame = pd.DataFrame(rows)
    frame["caveats"] = [describe_caveats(row) for row in rows]
    return frame


def describe_caveats(result: dict[str, Any]) -> str:
    """Return what limits the comparison with the paper, such as a partial evaluation."""
    caveats = []
    if not result["canonical"]:
        caveats.append("non-canonical input")
    if result["partial"]:
        caveats.append(
            f"partial: {result['scored_tokens']:,} of {result['split_tokens']:,} tokens"
        )
    return "; ".join(caveats)


def comparison_table(results: pd.DataFrame) -> pd.DataFrame:
    """Return one row per result with the paper's figure beside it, for display."""
    table = pd.DataFrame(
        {
            "dataset": results["dataset"],
            "split": results["split"],
            "metric": results["metric"].map(METRIC_LABELS),
            "value": results["value"],
            "paper": results["paper_value"].astype("float64"),
            "difference": results["value"] - results["paper_value"].astype("float64"),
            "preset": results["preset"],
            "checkpoint step": results["checkpoint_step"],
            "caveats": results["caveats"].replace("", "none"),
        }
    )
    return table.sort_values(["dataset", "split"], ignore_index=True)


def short_caveats(result: dict[str, Any]) -> str:
    """Return the caveats in a few words for a figure label, such as "partial (0.08%)"."""
    caveats = []
    if not result["canonical"]:
        caveats.append("non-canonical")
    if result["partial"]:
        share = 100 * result["scored_tokens"] / result["split_tokens"]
        caveats.append(f"partial ({share:.2g}%)")
    return ", ".join(caveats)


def figure_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Return the bars of the comparison figure: each result, and the paper's figure per dataset.

    Each row has dataset, label (the bar's name), value, source ("tvq" or "paper") and
    caveats (short_caveats; empty for the paper's figures). Per dataset, the validation
    result comes first, then the test result and the paper's test figure.
    """
    rows = []
    ordered = results.sort_values(["dataset", "split"], ascending=[True, False])
    for result in ordered.to_dict("records"):
        rows.append(
            {
                "dataset": result["dataset"],
                "label": f"tvq {result['split']}",
                "value": result["value"],
                "source": "tvq",
                "caveats": short_caveats(result),
            }
        )
    papers = results.dropna(subset=["paper_value"]).drop_duplicates("dataset")
    for result in papers.to_dict("records"):
        rows.append(
            {
                "dataset": result["dataset"],
                "label": "paper test",
                "value": float(result["paper_value"]),
                "source": "paper",
                "caveats": "",
            }
        )
    return pd.DataFrame(rows, columns=["dataset", "label", "value", "source", "caveats"])
