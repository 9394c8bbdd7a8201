"""The report's figures, drawn with seaborn, and saving them as PNG files.

Each plot function takes the data frames of the loaders in tvq.report and returns a
matplotlib Figure, which the notebook shows and passes to save_figure. "The paper" is
Transformer-VQ (Lingle, ICLR 2024); its figures come from the result files and from
tvq.report.throughput.PAPER_SPEEDUP_CLAIMS.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from tvq.report.results import METRIC_LABELS
from tvq.report.throughput import PAPER_SPEEDUP_CLAIMS, short_status
from tvq.report.training import TrainingRun

# Set by `tvq report` to a folder that receives the figures until the whole notebook has
# run. tvq report then moves them to their paths, so a failed notebook leaves none behind.
STAGING_ENV = "TVQ_REPORT_STAGING_DIR"
STAGED_FIGURES = "figures.jsonl"
DPI = 120

ATTN_COLORS = {"vq": "tab:blue", "full": "tab:orange"}
SOURCE_COLORS = {"tvq": "tab:blue", "paper": "tab:gray"}
CAVEAT_HATCH = "//"
# Line dashes (seaborn's form: "" is solid) and marker for the 1st, 2nd, ... dtype.
DTYPE_STYLES = [("", "o"), ((4, 1.5), "s"), ((1, 1), "^"), ((3, 1, 1, 1), "D")]
# A red ring around a marker: a configuration timed for one step, over the time budget.
RING_STYLE = {"s": 160, "facecolors": "none", "edgecolors": "red", "linewidths": 1.5, "zorder": 5}


def save_figure(figure: Figure, figures_dir: str | Path, name: str) -> Path:
    """Save figure as figures_dir/name (a .png name) and return that path.

    Under `tvq report` the PNG goes to the staging folder named by TVQ_REPORT_STAGING_DIR,
    with its path recorded in figures.jsonl there; otherwise it is written in place.
    """
    if not name.endswith(".png"):
        raise ValueError(f"figure name {name!r} must end in .png")
    target = Path(figures_dir) / name
    staging = os.environ.get(STAGING_ENV)
    if staging:
        staging_dir = Path(staging)
        staged = staging_dir / f"figure-{len(list(staging_dir.glob('figure-*.png')))}.png"
        figure.savefig(staged, dpi=DPI, bbox_inches="tight")
        record = {"staged": staged.name, "target": str(target.absolute()), "given": str(target)}
        with (staging_dir / STAGED_FIGURES).open("a") as manifest:
            manifest.write(json.dumps(record) + "\n")
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp.png")
    try:
        figure.savefig(temporary, dpi=DPI, bbox_inches="tight")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def mark_at_bottom(ax, x: float, label: str, color: str) -> None:
    """Draw an x marker and a vertical label at the bottom of ax, for a point with no value."""
    transform = ax.get_xaxis_transform()
    ax.plot([x], [0.04], marker="x", markersize=9, mew=2, color=color, transform=transform,
            clip_on=False)
    ax.text(x, 0.08, label, rotation=90, ha="center", va="bottom", fontsize=8, color=color,
            transform=transform)


def plot_results(figure_rows: pd.DataFrame, metrics: dict[str, str]) -> Figure:
    """Draw one bar panel per dataset: tvq's results next to the paper's test figure.

    figure_rows comes from tvq.report.results.figure_rows; metrics maps each dataset to
    its metric name. Bars of results with caveats (non-canonical input, partial
    evaluation) are hatched and labelled with the caveat.
    """
    datasets = sorted(set(figure_rows["dataset"]))
    figure, axes = plt.subplots(
        1, len(datasets), figsize=(4.2 * len(datasets), 4.2), squeeze=False
    )
    for ax, dataset in zip(axes[0], datasets, strict=True):
        rows = figure_rows[figure_rows["dataset"] == dataset].reset_index(drop=True)
        sns.barplot(data=rows, x="label", y="value", order=list(rows["label"]), ax=ax)
        bars = ax.containers[0]
        labels = []
        # Bars come in the order of `order`, which is the order of rows.
        for bar, row in zip(bars, rows.itertuples(), strict=True):
            bar.set_facecolor(SOURCE_COLORS[row.source])
            if row.caveats:
                bar.set_hatch(CAVEAT_HATCH)
                bar.set_edgecolor("black")
            labels.append(f"{row.value:.3f}" + (f"\n{row.caveats}" if row.caveats else ""))
        ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
        ax.margins(y=0.25)
        ax.set_xlabel("")
        ax.set_ylabel(f"{METRIC_LABELS[metrics[dataset]]} (lower is better)")
        ax.set_title(dataset)
    handles = [
        Patch(facecolor=SOURCE_COLORS["tvq"], label="tvq"),
        Patch(facecolor=SOURCE_COLORS["paper"], label="paper (test)"),
        Patch(facecolor="white", edgecolor="black", hatch=CAVEAT_HATCH,
              label="non-canonical input or partial evaluation"),
    ]
    figure.legend(handles=handles, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.06))
    figure.tight_layout()
    return figure


def plot_throughput(throughput: pd.DataFrame) -> Figure:
    """Draw tokens/s against sequence length, log-log, one panel per head type.

    Colour is the attention type and line style the dtype. A row that ran over the time
    budget but has a timed step gets a red ring around its marker. A row with no timing
    (out of memory, failed) is an x at the bottom of its panel, labelled with its status.
    """
    head_types = list(dict.fromkeys(throughput["head_type"]))
    figure, axes = plt.subplots(
        1, len(head_types), figsize=(5 * len(head_types), 4.2), squeeze=False, sharey=True
    )
    timed = throughput[throughput["timed"]]
    # Fixed per dtype, so that a dtype looks the same in every panel.
    dtype_styles = dict(zip(dict.fromkeys(throughput["dtype"]), DTYPE_STYLES, strict=False))
    for ax, head_type in zip(axes[0], head_types, strict=True):
        panel = timed[timed["head_type"] == head_type]
        if not panel.empty:
            sns.lineplot(
                data=panel, x="sequence_len", y="tokens_per_s", hue="attn_type",
                hue_order=list(ATTN_COLORS), palette=ATTN_COLORS, style="dtype",
                style_order=list(dtype_styles), dashes=_dashes(dtype_styles),
                markers=_markers(dtype_styles), ax=ax, legend=False,
            )
        over_budget = panel[panel["status"] != "ok"]
        ax.scatter(
            over_budget["sequence_len"], over_budget["tokens_per_s"], **RING_STYLE
        )
        untimed = throughput[(throughput["head_type"] == head_type) & ~throughput["timed"]]
        for row in untimed.itertuples():
            mark_at_bottom(
                ax, row.sequence_len, f"{row.attn_type} {row.dtype}: {short_status(row.status)}",
                ATTN_COLORS[row.attn_type],
            )
        # A log axis needs a positive value; a panel where nothing was timed stays linear.
        ax.set(xscale="log", title=head_type)
        if (panel["tokens_per_s"] > 0).any():
            ax.set_yscale("log")
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel("training tokens/s")
        _set_length_ticks(ax, throughput["sequence_len"])
    handles = [
        Line2D([], [], color=color, marker="o", label=attn_type)
        for attn_type, color in ATTN_COLORS.items()
    ]
    for dtype, (dashes, marker) in dtype_styles.items():
        linestyle = (0, dashes) if dashes else "-"
        handles.append(
            Line2D([], [], color="gray", linestyle=linestyle, marker=marker, label=dtype)
        )
    handles.append(
        Line2D([], [], linestyle="", marker="o", markersize=12, markerfacecolor="none",
               markeredgecolor="red", label="over budget: one timed step")
    )
    axes[0][0].legend(handles=handles, fontsize=8)
    figure.tight_layout()
    return figure


def plot_speedup(speedup: pd.DataFrame) -> Figure:
    """Draw vq's speed-up over full against sequence length with the paper's claims.

    Colour is the head type and line style the dtype. Lengths where either side has no
    timing are an x at the bottom, labelled with the reason. A speed-up against a full
    row that ran over budget (one timed step) gets a red ring around its marker.
    """
    figure, ax = plt.subplots(figsize=(7, 4.8))
    timed = speedup[speedup["speedup"].notna()]
    if not timed.empty:
        sns.lineplot(
            data=timed, x="sequence_len", y="speedup", hue="head_type", style="dtype",
            markers=True, ax=ax,
        )
    over_budget = timed[timed["full_status"] != "ok"]
    if not over_budget.empty:
        ax.scatter(
            over_budget["sequence_len"], over_budget["speedup"],
            label="full over budget: one timed step", **RING_STYLE,
        )
    claims = pd.Series(PAPER_SPEEDUP_CLAIMS)
    ax.scatter(
        claims.index, claims.to_numpy(), marker="^", s=140, color="black", zorder=6,
        label="paper: over 3x at T=8192, over 12x at T=32768",
    )
    ax.axhline(1.0, color="gray", linewidth=1, linestyle=":")
    for row in speedup[speedup["speedup"].isna()].itertuples():
        reason = "vq: no timing" if np.isnan(row.vq_tokens_per_s) else (
            f"full: {short_status(row.full_status)}"
        )
        mark_at_bottom(ax, row.sequence_len, f"{row.head_type} {row.dtype}: {reason}", "black")
    # The paper's claims are always drawn, so the log axis has a positive value.
    ax.set(xscale="log", yscale="log")
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel("speed-up of vq over full (tokens/s ratio)")
    lengths = pd.concat([speedup["sequence_len"], claims.index.to_series()])
    _set_length_ticks(ax, lengths)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _dashes(styles: dict[str, tuple]) -> dict[str, tuple]:
    return {level: dashes for level, (dashes, _) in styles.items()}


def _markers(styles: dict[str, tuple]) -> dict[str, str]:
    return {level: marker for level, (_, marker) in styles.items()}


def _set_length_ticks(ax, lengths: pd.Series) -> None:
    ticks = sorted(set(int(length) for length in lengths))
    ax.set_xticks(ticks, [str(tick) for tick in ticks], rotation=45)
    ax.minorticks_off()


def plot_training_curves(runs: list[TrainingRun]) -> Figure:
    """Draw, per run, training and validation loss against step, and the learning rate."""
    figure, axes = plt.subplots(
        len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False
    )
    for (loss_ax, lr_ax), run in zip(axes, runs, strict=True):
        losses = pd.concat(
            [
                run.train[["step", "loss"]].assign(curve="train (mean since the last line)"),
                run.validation.rename(columns={"val_loss": "loss"}).assign(curve="validation"),
            ],
            ignore_index=True,
        )
        sns.lineplot(data=losses, x="step", y="loss", hue="curve", marker=".", ax=loss_ax)
        loss_ax.set_ylabel("loss (nats/token)")
        loss_ax.set_title(f"{run.name}: loss")
        sns.lineplot(data=run.train, x="step", y="learning_rate", ax=lr_ax)
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_title(f"{run.name}: learning rate")
    figure.tight_layout()
    return figure


def plot_codebook(runs: list[TrainingRun]) -> Figure:
    """Draw, per run, each attention sublayer's codebook perplexity and usage against step.

    Colour is the layer and line style the attention sublayer within it (shga layers
    have two). A run with full attention logs zeros, as it has no codebook.
    """
    figure, axes = plt.subplots(
        len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False
    )
    for (perplexity_ax, usage_ax), run in zip(axes, runs, strict=True):
        codebook = run.codebook
        style = "sublayer" if codebook["sublayer"].nunique() > 1 else None
        for ax, column, label in (
            (perplexity_ax, "perplexity", "codebook perplexity (codes)"),
            (usage_ax, "usage", "fraction of codes used per batch"),
        ):
            sns.lineplot(
                data=codebook, x="step", y=column, hue="layer", style=style,
                palette="viridis", legend="brief", ax=ax,
            )
            ax.set_ylabel(label)
            ax.set_title(f"{run.name}: {column}")
        usage_ax.set_ylim(0, 1.05)
    figure.tight_layout()
    return figure
