"""Training metrics: WORKDIR/metrics.jsonl, and optionally TensorBoard and Weights & Biases.

metrics.jsonl contains one JSON object per line with a `step` and a `kind`: "train" lines
carry losses, learning rate, gradient norm, tokens/s and per-layer codebook figures;
"validation" lines carry the validation loss. A resumed run first drops the lines past
the step it resumes from, so the file never holds two histories of the same steps.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from tvq.files import write_text_atomic
from tvq.model.config import ConfigError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Columns of the CSV views of metrics.jsonl, a format that `dvc plots` and spreadsheets read.
CURVES = {
    "train_curve.csv": (
        "train",
        ["step", "loss", "ce_loss", "learning_rate", "grad_norm", "tokens_per_s"],
    ),
    "validation_curve.csv": ("validation", ["step", "val_loss"]),
}


def truncate_after(path: Path, step: int) -> int:
    """Keep the lines of metrics.jsonl up to `step`; return how many other lines were dropped.

    Lines past `step` belong to steps that will run again. A line that is not a JSON
    record, such as one cut short by a killed run, is dropped too, and the file is
    rewritten to end with a newline so that appended records stay one per line.
    """
    path = Path(path)
    if not path.exists():
        return 0
    text = path.read_text(errors="replace")
    kept, dropped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped or (text and not text.endswith("\n")):
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


def check_loggers(*, tensorboard: bool, wandb: bool) -> None:
    """Raise ConfigError if an optional logger is asked for but not installed."""
    import importlib.util

    requested_loggers = ((tensorboard, "tensorboardX", "tensorboard"), (wandb, "wandb", "wandb"))
    for requested, module, key in requested_loggers:
        if requested and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"{key}: true needs the {module} package; pip install {module}, or set "
                f"{key}: false"
            )


class MetricsLog:
    """Append records to metrics.jsonl and mirror scalars to the optional loggers.

    With enabled=False (the processes other than 0 of a multi-process job) it opens
    nothing and writes nothing.
    """

    def __init__(
        self, workdir: Path, *, tensorboard: bool = False, wandb: bool = False,
        wandb_project: str = "tvq", run_config: dict[str, Any] | None = None,
        enabled: bool = True,
    ):
        check_loggers(tensorboard=tensorboard, wandb=wandb)
        self.path = Path(workdir) / METRICS_FILE
        self.enabled = enabled
        self.file = self.path.open("a") if enabled else None
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))
        if wandb:
            import wandb as wandb_module

            self.wandb = wandb_module.init(
                project=wandb_project, dir=str(workdir), config=run_config, resume="allow"
            )

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {
            f"{record['kind']}/{key}": value
            for key, value in record.items()
            if key not in ("step", "kind") and isinstance(value, int | float)
        }
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def write_curves(workdir: Path) -> list[Path]:
    """Write the train and validation lines of metrics.jsonl as CSV files beside it."""
    workdir = Path(workdir)
    lines = (workdir / METRICS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    written = []
    for name, (kind, columns) in CURVES.items():
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(record for record in records if record.get("kind") == kind)
        write_text_atomic(workdir / name, text.getvalue())
        written.append(workdir / name)
    return written
