"""HTTP(S) download with resume, retries, a progress bar and an atomic rename."""

from __future__ import annotations

import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from tvq.data.errors import DataError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def partial_path(dest: Path) -> Path:
    """Return where a download in progress is kept, so that a rerun can resume it."""
    return dest.with_name(dest.name + ".part")


def _fetch_once(url: str, part: Path, timeout_s: float, progress: bool) -> None:
    """Append the rest of url to `part`, asking the server to skip what is already there."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "tvq"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")

    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        if offset and response.status != 206:
            log.info("%s does not support resuming; downloading from the start", url)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        mode = "ab" if offset else "wb"
        with (
            part.open(mode) as handle,
            tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"download {Path(url).name}", disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(CHUNK_BYTES):
                handle.write(chunk)
                bar.update(len(chunk))

    size = part.stat().st_size
    if total is not None and size != total:
        raise http.client.IncompleteRead(b"", total - size)


def download(
    url: str,
    dest: Path,
    *,
    retries: int = 5,
    timeout_s: float = 60.0,
    backoff_s: float = 2.0,
    progress: bool = True,
) -> Path:
    """Download url to dest, resuming a partial file left by an earlier attempt.

    Bytes arrive in `dest.part`, which is renamed to dest only once the server's
    Content-Length has been received in full, so dest is never a truncated file.
    Connection errors and short reads are retried `retries` times with exponential
    backoff; HTTP errors such as 404 are not.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(dest)

    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout_s, progress)
            break
        except urllib.error.HTTPError as error:
            if error.code == 416 and part.exists():
                # The partial file is at least as long as the resource: start again.
                part.unlink()
                continue
            raise DataError(
                f"download of {url} failed with HTTP {error.code} {error.reason}; "
                "check the URL or pass a local file as the source"
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            if attempt == retries:
                raise DataError(
                    f"download of {url} failed after {retries + 1} attempts ({error}); "
                    f"rerun to resume from the {part.stat().st_size if part.exists() else 0} "
                    f"bytes kept in {part}, or pass a local file as the source"
                ) from None
            wait = backoff_s * 2**attempt
            log.warning("download of %s interrupted (%s); retry %d/%d in %.0f s",
                        url, error, attempt + 1, retries, wait)
            time.sleep(wait)

    os.replace(part, dest)
    return dest
