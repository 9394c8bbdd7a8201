"""Reading a raw input file that may be zip, bzip2, gzip or plain, and hashing it."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import zipfile
import zlib
from pathlib import Path

from tvq.data.errors import DataError

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
XZ_MAGIC = b"\xfd7zXZ"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BZ2_MAGIC = b"BZh"
GZIP_MAGIC = b"\x1f\x8b"


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Return the hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_maybe_compressed(path: Path) -> bytes:
    """Return the decompressed content of a zip (one member), bz2, gz or plain file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input file {path} not found; check the path")
    if not path.is_file():
        raise DataError(f"input {path} is not a regular file; pass the path of a file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(6)
    except OSError as error:
        raise DataError(
            f"input file {path} cannot be read ({error.strerror}); check its permissions"
        ) from None
    if magic.startswith(EMPTY_ZIP_MAGIC):
        raise DataError(f"zip archive {path} contains no files; pass an archive with one file")
    if magic.startswith((XZ_MAGIC, ZSTD_MAGIC)):
        raise DataError(
            f"{path} is xz or zstd compressed, which tvq does not read; decompress it first "
            "or recompress it as zip, bz2 or gz"
        )

    try:
        if magic.startswith(ZIP_MAGIC):
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.infolist() if not m.is_dir()]
                if len(members) != 1:
                    names = ", ".join(m.filename for m in members) or "none"
                    raise DataError(
                        f"zip archive {path} must contain exactly one file, found: {names}"
                    )
                return archive.read(members[0])
        if magic.startswith(BZ2_MAGIC):
            return bz2.decompress(path.read_bytes())
        if magic.startswith(GZIP_MAGIC):
            return gzip.decompress(path.read_bytes())
    except (RuntimeError, NotImplementedError) as error:
        # zipfile raises these for encrypted members and unsupported compression methods.
        raise DataError(
            f"zip archive {path} cannot be extracted ({error}); recompress it without a "
            "password using deflate, or pass the plain file"
        ) from None
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as error:
        raise DataError(
            f"archive {path} is corrupt or truncated ({error}); download or copy it again, "
            "or pass an intact file"
        ) from None
    return path.read_bytes()
