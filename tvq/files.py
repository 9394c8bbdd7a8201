"""Writing result files whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# Termination signals (SIGTERM, SIGINT) received by a command that stops on the first
# one. A handler's exception can be lost when the signal lands in a weakref callback,
# so write_text_atomic also checks this list and writes nothing once a signal arrived.
STOP_SIGNALS: list[int] = []


def raise_if_stopped() -> None:
    """Raise SystemExit with the status of the first termination signal received, if any."""
    if STOP_SIGNALS:
        raise SystemExit(128 + STOP_SIGNALS[0])


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to path as UTF-8, whole or not at all (see `write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write data to path through a temporary file in the same folder and a rename, so a
    reader never sees a half-written file and a crash leaves the old file in place.

    A symbolic link is followed, so the file it points to is replaced. An existing path
    that is not a regular file (a device such as /dev/null, or a pipe) is written into
    directly, because renaming over it would replace the device itself.
    """
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file() and not path.is_dir():
        with path.open("wb") as file:
            file.write(data)
        return

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        # mkstemp makes the file private to its owner; give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        raise_if_stopped()
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def check_writable(path: Path) -> None:
    """Raise OSError now, naming path, if a file cannot later be written there (its folder
    is created)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "output path is a folder; give a file path", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".probe"
        )
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(
            20, "a file is in the way of the output's folder; choose another path", str(path)
        ) from None
    except PermissionError:
        raise PermissionError(
            13, "permission denied for the output's folder; choose a writable path", str(path)
        ) from None
    probe.close()
