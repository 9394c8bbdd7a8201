"""Score a split with a run's best checkpoint and write the result JSON.

Every token of the split is a target exactly once: the split is cut into sequences of
sequence_len tokens, each starting from the end-of-sequence id without the previous
sequence as context, and the last batch is padded and masked. The metric depends on the
data: bits per byte for byte-level text, bits per dimension for ImageNet64, and
word-level perplexity (with token-level beside it) for PG-19 and SentencePiece text.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import tvq
from tvq.data.raw import file_digest
from tvq.data.splits import token_path
from tvq.data.vocab import decode_bytes
from tvq.distributed import any_process, is_primary
from tvq.evaluation.metrics import bits_per_unit, perplexity
from tvq.files import check_writable, write_json_atomic
from tvq.model.config import ConfigError
from tvq.train.checkpoint import Checkpoints
from tvq.train.config import RunConfig, config_differences, load_run_config
from tvq.train.errors import CheckpointError
from tvq.train.loop import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    check_batch_sizes,
    check_data,
    data_fingerprint,
    load_tokens,
    stop_reason,
    stop_requests,
    stop_status,
)
from tvq.train.step import Trainer, make_mesh, param_count

log = logging.getLogger(__name__)

# Words in PG-19's splits as published with the dataset; the prepared data is checked
# against them when it is the canonical dataset.
PG19_PUBLISHED_WORDS = {"test": 6_966_499, "validation": 3_007_061}
# Test results of the Transformer-VQ paper, for comparison in the result JSON.
PAPER_TEST_RESULTS = {"enwik8": 0.99, "pg19": 26.6, "imagenet64": 3.16}


def metric_name(manifest: dict[str, Any]) -> str:
    if manifest.get("dataset") == "imagenet64":
        return "bits_per_dim"
    if manifest.get("dataset") == "pg19" or manifest["vocab"]["type"] == "sentencepiece":
        return "word_perplexity"
    return "bits_per_byte"


def decoded_text(tokens: np.ndarray, manifest: dict[str, Any]) -> bytes:
    """Return the UTF-8 bytes that the tokens stand for, without the special ids."""
    if manifest["vocab"]["type"] == "bytes":
        return decode_bytes(tokens)
    from tvq.data.sentencepiece_vocab import SentencePieceVocab

    return SentencePieceVocab(Path(manifest["vocab"]["model"])).decode(tokens).encode()


def load_workdir_config(workdir: Path) -> RunConfig:
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise ConfigError(
            f"{path} not found; run `tvq train` with --workdir {workdir} first, or pass --config"
        )
    return load_run_config([path])


@dataclasses.dataclass
class RestoredCheckpoint:
    """A run's best checkpoint, read back with the run's model."""

    trainer: Trainer
    state: dict[str, Any]
    step: int
    meta: dict[str, Any]
    val_loss: float | None
    directory: Path


def restore_best_checkpoint(workdir: Path, config: RunConfig) -> RestoredCheckpoint:
    """Read the checkpoint of lowest validation loss in WORKDIR/checkpoints.

    Raises CheckpointError when there is none, when it cannot be read, or when it was
    written by a model config other than `config.model`.
    """
    checkpoints = Checkpoints(workdir / CHECKPOINT_DIR, read_only=True)
    try:
        step = checkpoints.best_step()
        if step is None:
            raise CheckpointError(
                f"no checkpoint in {checkpoints.directory}; run `tvq train` with --workdir "
                f"{workdir} first"
            )
        meta = checkpoints.read_meta(step)
        saved = meta.get("config", {})
        # Only the model must match: training keys do not change what is evaluated.
        model_keys = {k: v for k, v in config.model.to_dict().items() if k in saved}
        differences = config_differences({k: saved[k] for k in model_keys}, model_keys)
        if differences:
            changes = "; ".join(differences)
            raise CheckpointError(
                f"checkpoint {checkpoints.directory / str(step)} has a different model "
                f"config ({changes}); use the run's own config"
            )
        checkpoint_val_loss = checkpoints.val_loss(step)

        mesh = make_mesh(config.train.mesh_data, config.train.mesh_model)
        check_batch_sizes(config, mesh.shape["data"], keys=("eval_batch_size",))
        trainer = Trainer(config, mesh)
        state = checkpoints.restore(step, trainer.abstract_state())
    finally:
        checkpoints.close()
    return RestoredCheckpoint(
        trainer, state, step, meta, checkpoint_val_loss, checkpoints.directory
    )


def evaluate(
    workdir: Path,
    data_dir: Path,
    split: str,
    out: Path,
    *,
    config: RunConfig | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score `split` with the best checkpoint in WORKDIR and write the result to `out`."""
    # Signals only set a flag, which is checked between batches, because an exception
    # raised inside JAX's compilation or callbacks would be lost or crash the process.
    with stop_requests() as stop:
        return _evaluate(
            Path(workdir), Path(data_dir), split, Path(out), config, max_tokens, progress, stop
        )


def _evaluate(
    workdir: Path,
    data_dir: Path,
    split: str,
    out: Path,
    config: RunConfig | None,
    max_tokens: int | None,
    progress: bool,
    stop: list[int],
) -> dict[str, Any]:
    started = time.perf_counter()
    config = config or load_workdir_config(workdir)
    c, t = config.model, config.train
    if max_tokens is not None and max_tokens < c.sequence_len:
        raise ConfigError(
            f"--max-tokens {max_tokens} is shorter than one sequence of {c.sequence_len} "
            "tokens; pass at least that many"
        )
    check_writable(out)
    manifest = check_data(config, data_dir)
    split_tokens = load_tokens(config, data_dir, split)
    partial = max_tokens is not None and max_tokens < len(split_tokens)
    tokens = split_tokens[:max_tokens] if partial else split_tokens

    restored = restore_best_checkpoint(workdir, config)
    trainer, state, step, meta = restored.trainer, restored.state, restored.step, restored.meta
    checkpoint_val_loss = restored.val_loss
    log.info(
        "scoring %s %s tokens of %s with the checkpoint of step %d",
        f"{len(tokens):,}", split, data_dir, step,
    )

    nats, targets = trainer.score_split(
        state, tokens, name=f"the {split} split", progress=progress, stop=stop
    )
    if any_process(bool(stop)):
        log.info("%s; no result written", stop_reason(stop))
        raise SystemExit(stop_status(stop))
    if targets != len(tokens):
        raise AssertionError(f"scored {targets} targets of a split of {len(tokens)} tokens")
    if not math.isfinite(nats):
        raise CheckpointError(
            f"the loss on {split} is {nats}: the checkpoint of step {step} in "
            f"{restored.directory} holds non-finite parameters"
        )

    described = manifest["splits"][split]
    if partial:
        text = decoded_text(np.asarray(tokens), manifest)
        scored_bytes, scored_words = len(text), len(text.split())
    else:
        scored_bytes, scored_words = described["bytes"], described["words"]

    metric = metric_name(manifest)
    result: dict[str, Any] = {
        "dataset": manifest.get("dataset"),
        "split": split,
        "metric": metric,
    }
    if metric == "word_perplexity":
        result["value"] = perplexity(nats, scored_words)
        result["token_perplexity"] = perplexity(nats, targets)
    else:
        # Bytes and ImageNet64 subpixels are one token each.
        result["value"] = bits_per_unit(nats, targets)
    if manifest["vocab"]["type"] != "bytes" and metric != "bits_per_dim":
        result["bits_per_byte"] = bits_per_unit(nats, scored_bytes)

    # A result is canonical only if the model was also trained on this (canonical) data.
    fingerprint = data_fingerprint(manifest)
    trained_on = meta.get("data", {})
    same_data = trained_on.get("fingerprint", fingerprint) == fingerprint
    if not same_data:
        log.warning(
            "the checkpoint was trained on other %s data than %s; the result is marked "
            "non-canonical", trained_on.get("dataset"), data_dir,
        )
    canonical = bool(manifest.get("canonical", False)) and same_data
    result.update(
        {
            "loss_nats_per_token": nats / targets,
            "scored_tokens": targets,
            "scored_bytes": scored_bytes,
            "scored_words": scored_words,
            "split_tokens": len(split_tokens),
            "partial": partial,
            "max_tokens": max_tokens,
            "preset": t.preset,
            "param_count": param_count(state["params"]),
            "checkpoint_step": step,
            "checkpoint_val_loss": checkpoint_val_loss,
            "input_sha256": file_digest(token_path(data_dir, split)),
            "source_sha256": manifest.get("source_sha256"),
            "canonical": canonical,
            "paper_value": PAPER_TEST_RESULTS.get(manifest.get("dataset"))
            if split == "test" else None,
            "sequence_len": c.sequence_len,
            "eval_batch_size": t.eval_batch_size,
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "wall_time_s": time.perf_counter() - started,
            "tvq_version": tvq.__version__,
        }
    )
    if manifest.get("dataset") == "pg19" and split in PG19_PUBLISHED_WORDS:
        published = PG19_PUBLISHED_WORDS[split]
        result["published_words"] = published
        if canonical and not partial and described["words"] != published:
            log.warning(
                "the prepared %s split has %s words, the published count is %s; the word-level "
                "perplexity uses the prepared count", split, f"{described['words']:,}",
                f"{published:,}",
            )
    if is_primary():
        write_json_atomic(out, result)
    note = f" (partial: first {targets:,} tokens)" if partial else ""
    log.info("%s %s = %.4f%s; wrote %s", split, metric, result["value"], note, out)
    return result
