"""Downloads and enwik8 preparation against a real HTTP server on 127.0.0.1."""

import hashlib
import io
import socket
import time
import zipfile

import numpy as np
import pytest

from tests.http_server import ServedFiles, serve
from tvq.data.download import download, partial_path
from tvq.data.enwik8 import ENWIK8, Reference, prepare_enwik8
from tvq.data.errors import DataError


def generated_text(n_bytes, seed=0):
    rng = np.random.default_rng(seed)
    words = [b"alpha", b"beta", b"<page>", b"\xc3\xa9t\xc3\xa9", b"\n", b"gamma"]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), size=n_bytes // 4))
    return text[:n_bytes]


def zipped(content, name="enwik8"):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, content)
    return buffer.getvalue()


def reference_of(content):
    return Reference(
        size=len(content),
        md5=hashlib.md5(content).hexdigest(),
        sha1=hashlib.sha1(content).hexdigest(),
    )


def test_download_success(tmp_path):
    body = generated_text(300_000)
    served = ServedFiles(files={"/data.bin": body})
    with serve(served) as base:
        path = download(f"{base}/data.bin", tmp_path / "data.bin", progress=False)
    assert path.read_bytes() == body
    assert not partial_path(path).exists()
    assert served.requests == [("/data.bin", None)]


def test_download_resumes_after_cut_connection(tmp_path):
    body = generated_text(3_000_000)
    served = ServedFiles(files={"/data.bin": body}, cut_after={"/data.bin": 1_000_000})
    with serve(served) as base:
        path = download(f"{base}/data.bin", tmp_path / "data.bin", backoff_s=0, progress=False)
    assert path.read_bytes() == body
    assert len(served.requests) == 2
    assert served.requests[1] == ("/data.bin", "bytes=1000000-")


def test_download_resumes_partial_file_from_earlier_run(tmp_path):
    body = generated_text(500_000)
    dest = tmp_path / "data.bin"
    partial_path(dest).write_bytes(body[:123_456])
    served = ServedFiles(files={"/data.bin": body})
    with serve(served) as base:
        download(f"{base}/data.bin", dest, progress=False)
    assert dest.read_bytes() == body
    assert served.requests == [("/data.bin", "bytes=123456-")]


def test_download_gives_up_and_keeps_partial(tmp_path):
    body = generated_text(400_000)
    served = ServedFiles(files={"/data.bin": body}, cut_after={"/data.bin": 100_000})
    dest = tmp_path / "data.bin"
    with serve(served) as base, pytest.raises(DataError, match=r"after 1 attempt\(s\).*rerun"):
        download(f"{base}/data.bin", dest, retries=0, progress=False)
    assert not dest.exists()
    assert partial_path(dest).read_bytes() == body[:100_000]


def test_download_not_found_is_not_retried(tmp_path):
    served = ServedFiles()
    with serve(served) as base, pytest.raises(DataError, match="HTTP 404"):
        download(f"{base}/missing.zip", tmp_path / "missing.zip", backoff_s=0, progress=False)
    assert len(served.requests) == 1
    assert not (tmp_path / "missing.zip").exists()


def test_prepare_canonical_download(tmp_path):
    content = generated_text(200_000)
    served = ServedFiles(files={"/enwik8.zip": zipped(content)})
    with serve(served) as base:
        url = f"{base}/enwik8.zip"
        manifest = prepare_enwik8(
            url, tmp_path / "out", tmp_path / "downloads",
            reference=reference_of(content), canonical_url=url, progress=False,
        )
    assert manifest["canonical"] is True
    assert manifest["source"] == url
    zip_sha256 = hashlib.sha256(served.files["/enwik8.zip"]).hexdigest()
    assert manifest["source_sha256"] == zip_sha256
    assert [manifest["splits"][s]["bytes"] for s in ("train", "validation", "test")] == [
        180_000, 10_000, 10_000,
    ]


def test_prepare_corrupt_archive(tmp_path):
    archive = bytearray(zipped(generated_text(200_000)))
    archive[len(archive) // 2 : len(archive) // 2 + 64] = b"\x00" * 64
    served = ServedFiles(files={"/enwik8.zip": bytes(archive)})
    with serve(served) as base:
        url = f"{base}/enwik8.zip"
        with pytest.raises(DataError, match="corrupt"):
            prepare_enwik8(url, tmp_path / "out", tmp_path / "downloads", canonical_url=url,
                           progress=False)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "downloads" / "enwik8.zip").exists()
    assert list(tmp_path.glob(".out*")) == []


def test_prepare_wrong_size_from_canonical_url(tmp_path):
    served = ServedFiles(files={"/enwik8.zip": zipped(generated_text(50_000))})
    with serve(served) as base:
        url = f"{base}/enwik8.zip"
        with pytest.raises(DataError, match="contains 50,000 bytes.*not enwik8's 100,000,000"):
            prepare_enwik8(url, tmp_path / "out", tmp_path / "downloads", reference=ENWIK8,
                           canonical_url=url, progress=False)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "downloads" / "enwik8.zip").exists()


def test_prepare_other_url_is_non_canonical(tmp_path):
    content = generated_text(40_000)
    served = ServedFiles(files={"/mirror/enwik8.zip": zipped(content)})
    with serve(served) as base:
        manifest = prepare_enwik8(f"{base}/mirror/enwik8.zip", tmp_path / "out",
                                  tmp_path / "downloads", progress=False)
    assert manifest["canonical"] is False
    assert manifest["content_bytes"] == 40_000


def test_download_restarts_when_server_resumes_elsewhere(tmp_path):
    body = generated_text(300_000)
    dest = tmp_path / "data.bin"
    partial_path(dest).write_bytes(body[:50_000])
    served = ServedFiles(files={"/data.bin": body}, wrong_range={"/data.bin"})
    with serve(served) as base:
        download(f"{base}/data.bin", dest, backoff_s=0, progress=False)
    assert dest.read_bytes() == body
    assert [r[1] for r in served.requests] == ["bytes=50000-", None]


def test_download_from_other_url_not_reused(tmp_path):
    first, second = b"first " * 1000, b"second " * 1000
    served = ServedFiles(files={"/a/data.bin": first, "/b/data.bin": second})
    dest = tmp_path / "data.bin"
    with serve(served) as base:
        assert download(f"{base}/a/data.bin", dest, progress=False).read_bytes() == first
        assert download(f"{base}/a/data.bin", dest, progress=False).read_bytes() == first
        assert download(f"{base}/b/data.bin", dest, progress=False).read_bytes() == second
    assert [path for path, _ in served.requests] == ["/a/data.bin", "/b/data.bin"]


def test_unsupported_url_scheme(tmp_path):
    with pytest.raises(DataError, match="unsupported URL scheme ftp://"):
        prepare_enwik8("ftp://127.0.0.1/enwik8.zip", tmp_path / "out", tmp_path / "dl",
                       progress=False)


def test_too_small_download_deleted(tmp_path):
    served = ServedFiles(files={"/tiny.txt": b"ab"})
    with serve(served) as base, pytest.raises(DataError, match="split 'validation' is empty"):
        prepare_enwik8(f"{base}/tiny.txt", tmp_path / "out", tmp_path / "dl", progress=False)
    assert not (tmp_path / "dl" / "tiny.txt").exists()


def test_unreachable_host_fails_at_once_and_leaves_nothing(tmp_path):
    # A port that was just free: nothing listens, so the connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dest = tmp_path / "downloads" / "data.bin"
    started = time.monotonic()
    with pytest.raises(DataError, match=r"after 1 attempt\(s\) .*refused.*local file"):
        download(f"http://127.0.0.1:{port}/data.bin", dest, backoff_s=30.0, progress=False)
    # No backoff wait was taken, and nothing is left for a rerun to trip over.
    assert time.monotonic() - started < 10
    assert list(dest.parent.iterdir()) == []
