"""Writing prepared splits: token files plus manifest.json, all or nothing."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tvq.data.errors import DataError

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"


def token_path(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.npy"


def check_replaceable(out_dir: Path, expected: set[str]) -> None:
    """Raise DataError unless out_dir is absent, empty, or holds only files named in expected.

    Replacing a folder deletes it, so a folder with any other file in it (a user's data,
    a parent folder given by mistake) is never replaced.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"output path {out_dir} is a file, not a folder; pass a folder path")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in expected)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise DataError(
            f"output folder {out_dir} contains files tvq did not write ({shown}), and "
            "preparing would delete them; pass a new or empty folder"
        )


@contextlib.contextmanager
def staged_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging folder that replaces out_dir only if the block succeeds.

    On an exception the staging folder is deleted and out_dir keeps whatever it held
    before, so a later stage never mistakes half-written files for finished output.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir == Path(out_dir.anchor):
        raise DataError("the output folder cannot be the file system root")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    # mkdtemp creates the folder private to its owner; give it the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    previous = None
    if out_dir.exists():
        previous = out_dir.with_name(f".{out_dir.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        out_dir.rename(previous)
    staging.rename(out_dir)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def check_output_dir(out_dir: Path) -> None:
    """Raise DataError early if write_splits would have to delete files tvq did not write."""
    expected = {MANIFEST} | {token_path(Path(out_dir), split).name for split in SPLITS}
    check_replaceable(out_dir, expected)


def write_splits(
    out_dir: Path, tokens: dict[str, np.ndarray], manifest: dict[str, Any]
) -> dict[str, Any]:
    """Write {split}.npy for each split and manifest.json into out_dir atomically."""
    for split in SPLITS:
        if split not in tokens:
            raise DataError(f"split {split!r} is missing from the prepared data")
        if len(tokens[split]) == 0:
            raise DataError(f"split {split!r} is empty; the input is too small to split")

    check_output_dir(out_dir)
    manifest = {
        **manifest,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with staged_output_dir(out_dir) as staging:
        for split in SPLITS:
            np.save(token_path(staging, split), tokens[split], allow_pickle=False)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_manifest(data_dir: Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise DataError(
            f"{path} not found; run `tvq prepare` for this dataset with --out-dir {data_dir}"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(
            f"{path} is not valid JSON ({error}); rerun `tvq prepare` with --out-dir {data_dir}"
        ) from None
    if not isinstance(manifest, dict) or not {"vocab", "splits"} <= set(manifest):
        raise DataError(
            f"{path} lacks the vocab and splits that `tvq prepare` writes; rerun it with "
            f"--out-dir {data_dir}"
        )
    return manifest


def load_split(data_dir: Path, split: str) -> np.ndarray:
    """Memory-map the token file of one split."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = token_path(data_dir, split)
    if not path.exists():
        raise DataError(
            f"token file {path} not found; run `tvq prepare` with --out-dir {data_dir}"
        )
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise DataError(
            f"token file {path} is truncated or corrupt ({error}); rerun `tvq prepare` with "
            f"--out-dir {data_dir}"
        ) from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise DataError(
            f"token file {path} contains a {tokens.dtype} array of shape {tokens.shape}, not one "
            f"row of token ids; rerun `tvq prepare` with --out-dir {data_dir}"
        )
    return tokens
