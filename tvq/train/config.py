"""Run configuration: model and training keys in one flat mapping, read from YAML files.

A run is described by a dataset file (config/enwik8.yaml) and a preset overlay
(config/presets/cpu.yaml): later files and then `--set key=value` overrides replace
earlier values. Keys that are TransformerConfig fields go to the model, the rest to
TrainConfig; any other key is an error, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tvq.model.config import ConfigError, TransformerConfig
from tvq.train.optimizer import OPTIMIZERS, SCHEDULES


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, checkpointing and logging of a run (names follow the official code)."""

    # Name recorded in results: smoke, cpu, paper, or anything for a hand-made run.
    preset: str = "custom"
    # Seed of the parameter initialisation, the batch order and dropout.
    seed: int = 0
    # Sequences per step, over all devices; a multiple of the number of devices.
    global_batch_size: int = 8
    # "adamw", "lion" or "adafactor".
    optimizer: str = "adamw"
    # Peak learning rate, reached after n_warmup_step steps.
    lr_max: float = 4e-4
    # Decay after warm-up to 10% of lr_max: "cosine", "inv_sqrt" or "linear".
    lr_schedule: str = "cosine"
    n_warmup_step: int = 1000
    # Length of the run in optimiser steps.
    n_max_step: int = 10_000
    # Global-norm gradient clipping threshold; 0 turns clipping off.
    grad_clip: float = 0.1
    # Decoupled weight decay per step on matrices, not scaled by the learning rate.
    wd_lam: float = 0.0
    # Steps between metric lines in metrics.jsonl.
    n_print_step: int = 100
    # Steps between checkpoints, each preceded by a validation pass.
    n_save_step: int = 1000
    # Newest checkpoints kept; the best one by validation loss is kept as well.
    n_save_keep: int = 3
    # Validation batches per periodic validation pass.
    n_eval_step: int = 16
    # Sequences per evaluation batch; a multiple of the number of devices.
    eval_batch_size: int = 8
    # Sizes of the device mesh's axes: `data` splits batches, `model` splits parameters
    # (see tvq.train.sharding). -1 takes the devices the other axis leaves.
    mesh_data: int = -1
    mesh_model: int = 1
    # Also log metrics to TensorBoard (needs tensorboardX) or Weights & Biases (wandb).
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "tvq"

    def __post_init__(self) -> None:
        errors = train_config_errors(self)
        if errors:
            raise ConfigError("; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys that may change between a checkpoint and the run resuming from it: the length
# and learning-rate schedule of the run (lowering lr_max is the usual remedy for a loss
# that diverged), clipping, weight decay and logging. Any other difference (the model,
# the optimiser, the batch size, the seed) makes the resumed run a different
# experiment, so resuming is rejected. The mesh may change: checkpoints restore onto any
# mesh shape.
RESUMABLE_KEYS = frozenset(
    {
        "n_max_step", "lr_max", "lr_schedule", "n_warmup_step", "grad_clip", "wd_lam",
        "n_print_step", "n_save_step", "n_save_keep", "n_eval_step", "eval_batch_size",
        "tensorboard", "wandb", "wandb_project", "mesh_data", "mesh_model",
    }
)


def train_config_errors(config: TrainConfig) -> list[str]:
    """List every problem with a TrainConfig, one message each."""
    errors = []
    if config.optimizer not in OPTIMIZERS:
        errors.append(
            f"unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    if config.lr_schedule not in SCHEDULES:
        errors.append(
            f"unknown lr_schedule {config.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}"
        )
    positive = (
        "global_batch_size", "n_max_step", "n_print_step", "n_save_step", "n_save_keep",
        "n_eval_step", "eval_batch_size",
    )
    for key in positive:
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            errors.append(f"{key} must be a positive integer, got {value!r}")
    for key in ("n_warmup_step", "seed"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            errors.append(f"{key} must be a non-negative integer, got {value!r}")
    if isinstance(config.seed, int) and config.seed >= 2**32:
        errors.append(f"seed must be below 2**32, got {config.seed}")
    for key in ("lr_max", "grad_clip", "wd_lam"):
        value = getattr(config, key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            errors.append(f"{key} must be a finite, non-negative number, got {value!r}")
    for key in ("preset", "wandb_project"):
        if not isinstance(getattr(config, key), str):
            errors.append(f"{key} must be a string, got {getattr(config, key)!r}")
    if isinstance(config.lr_max, int | float) and config.lr_max == 0:
        errors.append("lr_max must be positive, got 0")
    for key in ("mesh_data", "mesh_model"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or not (value > 0 or value == -1):
            errors.append(f"{key} must be a positive integer or -1 (the rest), got {value!r}")
    if config.mesh_data == -1 and config.mesh_model == -1:
        errors.append("mesh_data and mesh_model are both -1; give one of them a size")
    for key in ("tensorboard", "wandb"):
        if not isinstance(getattr(config, key), bool):
            errors.append(f"{key} must be true or false, got {getattr(config, key)!r}")
    return errors


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: TransformerConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        """Return the flat mapping that, written as YAML, loads back to this config."""
        return {**self.model.to_dict(), **self.train.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        model_keys = {f.name for f in dataclasses.fields(TransformerConfig)}
        train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - model_keys - train_keys)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(unknown)}; valid keys are the model's "
                f"({', '.join(sorted(model_keys))}) and training's "
                f"({', '.join(sorted(train_keys))})"
            )

        values = {key: _as_number(key, value) for key, value in values.items()}
        # Collect the problems of both parts before raising, so one run shows them all.
        errors = []
        parts = {}
        for name, kind, keys in (
            ("model", TransformerConfig, model_keys),
            ("train", TrainConfig, train_keys),
        ):
            try:
                parts[name] = kind(**{k: v for k, v in values.items() if k in keys})
            except ConfigError as error:
                errors.append(str(error))
            except TypeError as error:
                errors.append(f"bad config value: {error}")
        if errors:
            raise ConfigError("; ".join(errors))
        return cls(parts["model"], parts["train"])


FLOAT_KEYS = frozenset(
    f.name
    for kind in (TransformerConfig, TrainConfig)
    for f in dataclasses.fields(kind)
    if f.type == "float"
)


def _as_number(key: str, value: Any) -> Any:
    """Read '1e-3' as a number: YAML 1.1 reads exponents without a dot as strings."""
    if key in FLOAT_KEYS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `key=value` override; the value is read as a YAML scalar (1e-3, true)."""
    key, separator, raw = text.partition("=")
    key = key.strip()
    if not separator or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML") from None
    return key, value


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"config file {path} is not valid YAML ({reason})") from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise ConfigError(f"config file {path} must contain a mapping of names to values")
    return values


def load_run_config(files: Iterable[Path], overrides: Iterable[str] = ()) -> RunConfig:
    """Merge the YAML files in order, apply `key=value` overrides, and validate."""
    values: dict[str, Any] = {}
    for path in files:
        values.update(read_yaml_mapping(path))
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return RunConfig.from_dict(values)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Return the keys whose values differ and forbid resuming, as 'key: old -> new'."""
    keys = sorted((set(saved) | set(current)) - RESUMABLE_KEYS)
    return [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]
