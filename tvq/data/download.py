"""HTTP(S) download with resume, retries, a progress bar and an atomic rename."""

from __future__ import annotations

import errno
import http.client
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from tvq.data.errors import DataError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


def is_url(source: str) -> bool:
    """Return whether source is an http(s) URL; raise DataError for other URL schemes."""
    scheme, separator, _ = source.partition("://")
    if not separator or "/" in scheme:
        return False
    if scheme.lower() not in ("http", "https"):
        raise DataError(
            f"unsupported URL scheme {scheme}:// in {source}; use an http(s) URL or a local path"
        )
    return True


def source_url_path(dest: Path) -> Path:
    """Return the file beside a download that records the URL it came from."""
    return dest.with_name(dest.name + ".url")


class _RestartDownload(Exception):
    """The server resumed at another offset than requested; the partial file is void."""


def _unreachable(error: Exception) -> bool:
    """Return whether the host could not be reached at all (no network, no such host,
    connection refused). A retry seconds later rarely helps there, unlike after a
    connection cut mid-transfer."""
    reason = getattr(error, "reason", error)
    if isinstance(reason, socket.gaierror | ConnectionRefusedError):
        return True
    return isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)


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
        if offset:
            content_range = response.headers.get("Content-Range", "")
            start = content_range.removeprefix("bytes ").split("-")[0]
            if start != str(offset):
                part.unlink()
                raise _RestartDownload(
                    f"asked to resume at byte {offset}, got Content-Range {content_range!r}"
                )
        length = response.headers.get("Content-Length", "")
        total = offset + int(length) if length.isdigit() else None
        if total is None:
            log.warning("%s sends no valid Content-Length; the size cannot be verified", url)
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
    Content-Length has been received in full. A server that sends no Content-Length
    gets a warning, because a cut connection then looks like the end of the file.
    Connection errors and short reads are retried `retries` times with exponential
    backoff; HTTP errors such as 404 are not. `dest.url` records the URL, so an existing
    dest that came from another URL is downloaded again instead of reused.
    """
    dest = Path(dest)
    recorded = source_url_path(dest)
    if dest.is_file():
        if not recorded.exists() or recorded.read_text().strip() == url:
            return dest
        log.info("%s came from %s, not %s; downloading again", dest, recorded.read_text(), url)
        dest.unlink()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"download folder {dest.parent} cannot be created ({error.strerror}); pass a "
            "writable --download-dir"
        ) from None
    part = partial_path(dest)
    if recorded.exists() and recorded.read_text().strip() != url:
        part.unlink(missing_ok=True)

    for attempt in range(retries + 1):
        try:
            recorded.write_text(url + "\n")
            _fetch_once(url, part, timeout_s, progress)
            break
        except _RestartDownload as error:
            log.warning("%s: %s; downloading from the start", url, error)
            continue
        except ValueError as error:
            raise DataError(f"invalid URL {url} ({error}); check the URL") from None
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
            if attempt == retries or _unreachable(error):
                kept = part.stat().st_size if part.is_file() else 0
                fix = (
                    f"rerun to resume from the {kept:,} bytes kept in {part}"
                    if kept
                    else "check the URL and the network connection"
                )
                if not kept:
                    recorded.unlink(missing_ok=True)
                reason = getattr(error, "reason", error)
                raise DataError(
                    f"download of {url} failed after {attempt + 1} attempt(s) ({reason}); "
                    f"{fix}, or pass a local file as the source"
                ) from None
            wait = backoff_s * 2**attempt
            log.warning("download of %s interrupted (%s); retry %d/%d in %.0f s",
                        url, error, attempt + 1, retries, wait)
            time.sleep(wait)
    else:
        raise DataError(
            f"download of {url} did not complete in {retries + 1} attempts because the "
            "server did not resume where asked; rerun, or pass a local file as the source"
        )

    os.replace(part, dest)
    return dest
