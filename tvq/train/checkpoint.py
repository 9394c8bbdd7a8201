"""Orbax checkpoints of a run: the newest n_save_keep plus the best by validation loss.

Each checkpoint is WORKDIR/checkpoints/<step>/ with two items: `state` (parameters,
codebook statistics, optimiser state, step) and `meta` (the resolved config, the
validation loss if one was measured, the tvq version). Orbax writes each one into a
temporary folder and renames it when complete, so a killed save never leaves a
checkpoint that looks finished.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from tvq.train.errors import CheckpointError

log = logging.getLogger(__name__)

VAL_LOSS = "val_loss"


def _val_loss(metrics: dict[str, Any]) -> float:
    return float(metrics[VAL_LOSS])


def _is_closed_loop_error(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _drop_closed_loop_unraisable(unraisable) -> None:
    if not _is_closed_loop_error(unraisable.exc_value):
        sys.__unraisablehook__(unraisable)


def _silence_failed_reads() -> None:
    """Drop the reports of reads still in flight after a restore failed.

    When one array of a checkpoint cannot be read, orbax stops waiting while TensorStore
    completes or fails the other reads. Each of those then reports a traceback, through
    the asyncio logger or as an unraisable exception, that would bury the one-line
    error. The process is about to exit with that error, so nothing is lost.
    """
    sys.unraisablehook = lambda unraisable: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)


class Checkpoints:
    """Save, list and restore the checkpoints in one folder."""

    def __init__(self, directory: Path, keep: int = 3, *, read_only: bool = False):
        """read_only: open for restoring only (nothing is saved, so nothing is deleted)."""
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint path {self.directory} is a file, not a folder")
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.preservation_policy.LatestN(n=keep),
                # Sorted from the worst (highest) loss to the best, keeping the last one.
                checkpoint_managers.preservation_policy.BestN(
                    get_metric_fn=_val_loss,
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # Orbax writes the metrics passed to save() only when best_fn is set.
            best_fn=_val_loss,
            best_mode="min",
            # A reader neither creates the folder nor tidies it.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"), options=options
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def val_loss(self, step: int) -> float | None:
        metrics = self.manager.metrics(step)
        if not metrics or VAL_LOSS not in metrics:
            return None
        return _val_loss(metrics)

    def best_step(self) -> int | None:
        """Return the step with the lowest validation loss, or the newest if none was validated."""
        losses = {step: self.val_loss(step) for step in self.steps()}
        scored = [(loss, step) for step, loss in losses.items() if loss is not None]
        if scored:
            return min(scored)[1]
        return self.latest_step()

    def save(
        self, step: int, state: Any, meta: dict[str, Any], val_loss: float | None = None
    ) -> None:
        """Start writing a checkpoint; the write finishes in the background."""
        metrics = None if val_loss is None else {VAL_LOSS: float(val_loss)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({**meta, VAL_LOSS: val_loss}),
            ),
            metrics=metrics,
            force=True,
        )

    def _path(self, step: int) -> Path:
        return self.directory / str(step)

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
            return dict(restored["meta"])
        except Exception as error:
            raise self._unreadable(step, error) from error

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Read the state of `step` into arrays with abstract_state's shapes and shardings."""
        # Installed before reading: a read that completes after another one failed finds
        # orbax's event loop closed and reports it at once, from TensorStore's thread.
        if sys.unraisablehook is sys.__unraisablehook__:
            sys.unraisablehook = _drop_closed_loop_unraisable
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
            return restored["state"]
        except Exception as error:
            raise self._unreadable(step, error) from error

    def _unreadable(self, step: int, error: Exception) -> CheckpointError:
        _silence_failed_reads()
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        # TensorStore appends a long repr of its error object after this phrase.
        reason = reason.split(". See full TensorStore details")[0]
        return CheckpointError(
            f"checkpoint {self._path(step)} cannot be read ({type(error).__name__}: "
            f"{reason[:200]}); it was left in place: move it out of {self.directory} to "
            "resume from the checkpoint before it, or pass a new --workdir to start over"
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
