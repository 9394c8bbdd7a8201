"""The training loop: resume, step, validate, checkpoint, stop cleanly on signals.

WORKDIR layout:
    config.yaml          the resolved config of the run
    checkpoints/<step>/  orbax checkpoints (newest n_save_keep + best validation loss)
    metrics.jsonl        one JSON record per logged step
    train_curve.csv      its train lines, and validation_curve.csv its validation lines,
                         as CSV (written at the end of the run)
    train_summary.json   written last, once the run reaches n_max_step
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from tqdm import tqdm

import tvq
from tvq.data.batches import train_batches
from tvq.data.errors import DataError
from tvq.data.splits import load_manifest, load_split, token_path
from tvq.distributed import agreed_value, any_process, is_primary
from tvq.files import STOP_SIGNALS, write_json_atomic, write_text_atomic
from tvq.model.config import ConfigError
from tvq.train.checkpoint import Checkpoints
from tvq.train.config import RunConfig, config_differences
from tvq.train.errors import CheckpointError, TrainingError
from tvq.train.metrics_log import MetricsLog, check_loggers, truncate_after, write_curves
from tvq.train.step import Trainer, make_mesh, param_count

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "train_summary.json"


def check_data(config: RunConfig, data_dir: Path) -> dict[str, Any]:
    """Check that the prepared data fits the config, and return its manifest."""
    manifest = load_manifest(data_dir)
    vocab_size = manifest["vocab"]["size"]
    if config.model.n_vocab < vocab_size:
        raise ConfigError(
            f"n_vocab {config.model.n_vocab} is smaller than the {vocab_size} token ids of "
            f"{Path(data_dir) / 'manifest.json'}; set n_vocab: {vocab_size}"
        )
    return manifest


def load_tokens(config: RunConfig, data_dir: Path, split: str) -> np.ndarray:
    """Memory-map a split after checking that it has one sequence and only ids below n_vocab."""
    tokens = load_split(data_dir, split)
    path = token_path(data_dir, split)
    if len(tokens) < config.model.sequence_len:
        raise DataError(
            f"{path} contains {len(tokens):,} tokens, fewer than one sequence of "
            f"{config.model.sequence_len:,}; lower sequence_len or prepare more data"
        )
    largest = int(np.max(tokens))
    if largest >= config.model.n_vocab:
        raise DataError(
            f"{path} contains token id {largest}, outside the model's n_vocab "
            f"{config.model.n_vocab}; rerun `tvq prepare`, or raise n_vocab if the "
            "vocabulary really is larger"
        )
    return tokens


def check_batch_sizes(
    config: RunConfig, n_data: int, keys: tuple[str, ...] = ("global_batch_size", "eval_batch_size")
) -> None:
    for key in keys:
        value = getattr(config.train, key)
        if value % n_data:
            raise ConfigError(
                f"{key} {value} is not a multiple of the {n_data} devices on the data axis; "
                f"set it to a multiple of {n_data}"
            )


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """Return a digest of a manifest without its creation time: the same for the same data."""
    described = {key: value for key, value in manifest.items() if key != "created"}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def describe_data(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return what a checkpoint records of the data it was trained on."""
    return {
        "dataset": manifest.get("dataset"),
        "canonical": bool(manifest.get("canonical", False)),
        "fingerprint": data_fingerprint(manifest),
    }


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold an exclusive lock on WORKDIR/.lock, so that two runs never share a workdir."""
    path = Path(workdir) / ".lock"
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            owner = file.read().strip() or "unknown"
            raise TrainingError(
                f"workdir {workdir} is in use by another tvq train (process {owner}); wait "
                "for it to finish, or pass another --workdir"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turn SIGTERM and the first SIGINT into a stop request, checked between steps.

    Yields a list that receives the signal number. A second SIGINT interrupts at once.
    Signals that `tvq.cli.main` recorded before this started count as received.
    """
    received: list[int] = list(STOP_SIGNALS)

    def request_stop(signum, frame):
        if signum == signal.SIGINT and received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def validate(trainer: Trainer, state, tokens: np.ndarray, n_batches: int | None) -> float:
    """Return the mean cross-entropy in nats over the first n_batches validation batches
    (all of them if None)."""
    nats, targets = trainer.score_split(
        state, tokens, max_batches=n_batches, name="the validation split"
    )
    return nats / targets


def _resume(
    checkpoints: Checkpoints, trainer: Trainer, config: RunConfig, data: dict[str, Any]
) -> tuple[Any, int | None]:
    # Every process must resume from the same step, whatever it lists in a shared folder.
    latest = checkpoints.latest_step()
    step = agreed_value(-1 if latest is None else latest)
    if step == -1:
        return trainer.init_state(), None
    path = checkpoints.directory / str(step)
    start_over = f"or delete {checkpoints.directory.parent} (or pass a new --workdir) to start over"
    meta = checkpoints.read_meta(step)
    differences = config_differences(meta.get("config", {}), config.to_dict())
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was written with a different config "
            f"({'; '.join(differences)}); rerun with the checkpoint's settings, {start_over}"
        )
    trained_on = meta.get("data", {}).get("fingerprint")
    if trained_on is not None and trained_on != data["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on other data than the {data['dataset']} data now "
            f"in --data-dir; restore that data, {start_over}"
        )
    if step > config.train.n_max_step:
        raise CheckpointError(
            f"checkpoint {path} is past n_max_step {config.train.n_max_step}; set n_max_step "
            f"to at least {step}, {start_over}"
        )
    state = checkpoints.restore(step, trainer.abstract_state())
    return state, step


def stop_reason(stop: list[int]) -> str:
    """Describe why a command stops: its own signal, or another process's."""
    if stop:
        return f"{signal.Signals(stop[0]).name} received"
    return "another process of the job was stopped"


def stop_status(stop: list[int]) -> int:
    """Exit with the signal's status; a process stopped by another one exits like SIGTERM."""
    return 128 + (stop[0] if stop else signal.SIGTERM)


def _round(values) -> list:
    return np.round(np.asarray(values, np.float64), 4).tolist()


def train(
    config: RunConfig, data_dir: Path, workdir: Path, *, progress: bool = True
) -> dict[str, Any]:
    """Train to config.train.n_max_step, resuming from WORKDIR's newest checkpoint."""
    # Signals only set a flag, which is checked between steps, because an exception raised
    # inside JAX's compilation or callbacks would be lost or crash the process.
    with stop_requests() as stop:
        return _train(config, Path(data_dir), Path(workdir), progress, stop)


def _train(
    config: RunConfig, data_dir: Path, workdir: Path, progress: bool, stop: list[int]
) -> dict[str, Any]:
    started = time.perf_counter()
    t = config.train
    manifest = check_data(config, data_dir)
    check_loggers(tensorboard=t.tensorboard, wandb=t.wandb)
    train_tokens = load_tokens(config, data_dir, "train")
    validation_tokens = load_tokens(config, data_dir, "validation")

    mesh = make_mesh(t.mesh_data, t.mesh_model)
    check_batch_sizes(config, mesh.shape["data"])
    trainer = Trainer(config, mesh)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file; pass a folder")
    workdir.mkdir(parents=True, exist_ok=True)
    # The processes of one job share the workdir; process 0 holds the lock for them.
    lock = workdir_lock(workdir) if is_primary() else contextlib.nullcontext()
    with lock:
        return _train_locked(
            trainer, workdir, progress, stop, manifest, train_tokens, validation_tokens, started
        )


def _train_locked(
    trainer: Trainer,
    workdir: Path,
    progress: bool,
    stop: list[int],
    manifest: dict[str, Any],
    train_tokens: np.ndarray,
    validation_tokens: np.ndarray,
    started: float,
) -> dict[str, Any]:
    config, mesh = trainer.config, trainer.mesh
    c, t = config.model, config.train
    data = describe_data(manifest)
    checkpoints = Checkpoints(workdir / CHECKPOINT_DIR, keep=t.n_save_keep)

    try:
        state, resumed = _resume(checkpoints, trainer, config, data)
    except BaseException:
        # Orbax's background threads must stop before the interpreter exits.
        checkpoints.close()
        raise
    if any_process(bool(stop)):
        checkpoints.close()
        log.info("%s during start-up; nothing to save", stop_reason(stop))
        raise SystemExit(stop_status(stop))
    start_step = int(state["step"])
    devices = jax.devices()
    log.info(
        "%s parameters; %d %s device(s), mesh data=%d model=%d; data %s (%s train tokens)",
        f"{param_count(state['params']):,}", len(devices), devices[0].platform,
        mesh.shape["data"], mesh.shape["model"], manifest.get("dataset", "unnamed"),
        f"{len(train_tokens):,}",
    )
    if resumed is None:
        log.info("starting a new run in %s", workdir)
    else:
        log.info("resumed from step %d of %d (%s)", resumed, t.n_max_step, checkpoints.directory)


    primary = is_primary()

    def record_config() -> None:
        """Write config.yaml, and drop a summary that no longer describes the run."""
        if not primary:
            return
        write_text_atomic(workdir / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
        if start_step < t.n_max_step:
            (workdir / SUMMARY_FILE).unlink(missing_ok=True)

    if start_step >= t.n_max_step:
        record_config()
    dropped = truncate_after(workdir / "metrics.jsonl", start_step) if primary else 0
    if dropped:
        log.info(
            "dropped %d metrics.jsonl line(s) past step %d or unreadable", dropped, start_step
        )

    meta = {"config": config.to_dict(), "data": data, "tvq_version": tvq.__version__}
    # Only process 0 records metrics; the others compute the same replicated values.
    metrics_log = MetricsLog(
        workdir, tensorboard=t.tensorboard, wandb=t.wandb, wandb_project=t.wandb_project,
        run_config=config.to_dict(), enabled=primary,
    )
    tokens_per_step = t.global_batch_size * c.sequence_len
    saved_step = resumed
    window_losses: list[float] = []
    # Step times exclude the first step's compilation, validation and checkpointing.
    window_seconds, window_steps = 0.0, 0
    total_seconds, total_steps = 0.0, 0
    bar = tqdm(
        total=t.n_max_step, initial=start_step, unit="step", disable=not progress,
        dynamic_ncols=True, desc="train",
    )

    def save(step: int, val_loss: float | None) -> None:
        nonlocal saved_step
        checkpoints.save(step, state, meta, val_loss)
        saved_step = step

    try:
        batches = train_batches(
            train_tokens, seed=t.seed, batch_size=t.global_batch_size,
            sequence_len=c.sequence_len, start_step=start_step, num_steps=t.n_max_step,
            rows=trainer.local_rows(t.global_batch_size),
        )
        for step in range(start_step + 1, t.n_max_step + 1):
            tick = time.perf_counter()
            state, metrics = trainer.train_step(state, next(batches))
            loss = float(metrics["loss"])
            elapsed = time.perf_counter() - tick
            if step == start_step + 1:
                log.info("first step (with compilation) took %.1f s", elapsed)
                # Only now: a run that fails before its first step leaves the files of
                # the run its checkpoints belong to.
                if math.isfinite(loss):
                    record_config()
            else:
                window_seconds += elapsed
                window_steps += 1

            if not math.isfinite(loss):
                last = (
                    f"the newest checkpoint, step {saved_step}, is intact in "
                    f"{checkpoints.directory}" if saved_step is not None
                    else "no checkpoint was written before it"
                )
                raise TrainingError(
                    f"loss became {loss} at step {step}; stopped without saving, and "
                    f"{last}. Lower lr_max, lengthen n_warmup_step or set grad_clip, "
                    "then rerun"
                )
            window_losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

            if step % t.n_print_step == 0 or step == t.n_max_step:
                tokens_per_s = (
                    window_steps * tokens_per_step / window_seconds if window_steps else None
                )
                record = {
                    "step": step,
                    "kind": "train",
                    "loss": float(np.mean(window_losses)),
                    "ce_loss": float(metrics["ce_loss"]),
                    "commit_loss": float(metrics["commit_loss"]),
                    "learning_rate": float(metrics["learning_rate"]),
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_s": tokens_per_s,
                    "codebook_usage": _round(metrics["codebook_usage"]),
                    "codebook_perplexity": _round(metrics["codebook_perplexity"]),
                }
                metrics_log.write(record)
                speed = "n/a" if tokens_per_s is None else f"{tokens_per_s:,.0f}"
                bar.set_postfix(loss=f"{record['loss']:.4f}", tokens_per_s=speed)
                if not progress:
                    log.info(
                        "step %d/%d: loss %.4f, lr %.3g, grad norm %.3g, %s tokens/s",
                        step, t.n_max_step, record["loss"], record["learning_rate"],
                        record["grad_norm"], speed,
                    )
                total_seconds += window_seconds
                total_steps += window_steps
                window_losses, window_seconds, window_steps = [], 0.0, 0

            if step % t.n_save_step == 0 or step == t.n_max_step:
                val_loss = validate(trainer, state, validation_tokens, t.n_eval_step)
                if not math.isfinite(val_loss):
                    raise TrainingError(
                        f"validation loss became {val_loss} at step {step}; stopped "
                        "without saving. Lower lr_max, lengthen n_warmup_step or set "
                        "grad_clip, then rerun"
                    )
                metrics_log.write({"step": step, "kind": "validation", "val_loss": val_loss})
                log.info("step %d: validation loss %.4f nats/token", step, val_loss)
                save(step, val_loss)

            # A signal to one process stops all of them at the same step, because the
            # others would otherwise wait for it in the next step's collectives.
            if any_process(bool(stop)):
                if saved_step != step:
                    save(step, None)
                checkpoints.wait()
                log.info(
                    "%s: checkpoint of step %d saved in %s; rerun the same command to "
                    "resume", stop_reason(stop), step, checkpoints.directory,
                )
                raise SystemExit(stop_status(stop))

        checkpoints.wait()
        best_step = checkpoints.best_step()
        best_val_loss = None if best_step is None else checkpoints.val_loss(best_step)
    finally:
        bar.close()
        metrics_log.close()
        checkpoints.wait()
        checkpoints.close()

    summary = {
        "step": int(state["step"]),
        "n_max_step": t.n_max_step,
        "preset": t.preset,
        "param_count": param_count(state["params"]),
        "best_step": best_step,
        "best_val_loss": best_val_loss,
        "resumed_from": resumed,
        "steps_this_run": t.n_max_step - start_step,
        "tokens_per_s": total_steps * tokens_per_step / total_seconds if total_steps else None,
        "wall_time_s": time.perf_counter() - started,
        "tvq_version": tvq.__version__,
    }
    if primary:
        write_curves(workdir)
        write_json_atomic(workdir / SUMMARY_FILE, summary)
    log.info(
        "finished step %d; best validation loss %s at step %s; summary in %s",
        summary["step"], summary["best_val_loss"], summary["best_step"], workdir / SUMMARY_FILE,
    )
    return summary
