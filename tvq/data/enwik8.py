"""enwik8 and other byte-level text: download or read, verify, split, tokenise as bytes."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

import tvq
from tvq.data import vocab
from tvq.data.download import download, is_url
from tvq.data.errors import DataError
from tvq.data.raw import file_digest, read_maybe_compressed
from tvq.data.splits import SPLITS, check_output_dir, write_splits

log = logging.getLogger(__name__)

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"


@dataclass(frozen=True)
class Reference:
    """Size and digests that identify the canonical extracted file."""

    size: int
    md5: str
    sha1: str

    def matches(self, content: bytes) -> bool:
        return (
            len(content) == self.size
            and hashlib.md5(content).hexdigest() == self.md5
            and hashlib.sha1(content).hexdigest() == self.sha1
        )


# Published with the dataset (Hutter Prize / Large Text Compression Benchmark).
ENWIK8 = Reference(
    size=100_000_000,
    md5="a1fa5ffddb56f4953e226637dabbb36a",
    sha1="57b8363b814821dc9d47aa4d41f58733519076b2",
)
# Percentages of the bytes in train, validation and test. On the canonical 10^8 bytes
# this is the standard enwik8 split: the first 90M, the next 5M and the last 5M bytes.
SPLIT_PERCENT = (90, 5, 5)


def split_bounds(n_bytes: int) -> list[tuple[int, int]]:
    """Return the [start, stop) byte range of train, validation and test."""
    train = n_bytes * SPLIT_PERCENT[0] // 100
    validation = n_bytes * SPLIT_PERCENT[1] // 100
    return [(0, train), (train, train + validation), (train + validation, n_bytes)]


def byte_splits_manifest(content: bytes) -> tuple[dict, dict[str, Any]]:
    """Tokenise content as bytes and describe each split (tokens, bytes, words)."""
    tokens, described = {}, {}
    for split, (start, stop) in zip(SPLITS, split_bounds(len(content)), strict=True):
        piece = content[start:stop]
        tokens[split] = vocab.encode_bytes(piece)
        described[split] = {
            "tokens": len(piece),
            "bytes": len(piece),
            "words": len(piece.split()),
            "byte_range": [start, stop],
        }
    manifest = {
        "vocab": vocab.byte_vocab_manifest(),
        "dtype": str(tokens["train"].dtype),
        "splits": described,
    }
    return tokens, manifest


def _fetch(source: str, download_dir: Path, progress: bool) -> tuple[Path, bool]:
    """Return the local path of source and whether it was downloaded."""
    if not is_url(source):
        return Path(source), False
    name = Path(urlparse(source).path).name or "download"
    return download(source, Path(download_dir) / name, progress=progress), True


def prepare_enwik8(
    source: str,
    out_dir: Path,
    download_dir: Path,
    *,
    reference: Reference = ENWIK8,
    canonical_url: str = ENWIK8_URL,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare enwik8 splits in out_dir from the canonical URL, another URL or a file.

    Every input is split 90% / 5% / 5% by bytes, which on the canonical file is the
    standard 90M / 5M / 5M split. Input that is not byte for byte the canonical enwik8 is
    logged with a warning and recorded as non-canonical.
    A download from `canonical_url` that does not match `reference` is an error, and the
    bad file is deleted so that a rerun downloads it again.
    """
    check_output_dir(out_dir)
    raw_path, downloaded = _fetch(source, download_dir, progress)
    try:
        content = read_maybe_compressed(raw_path)
        canonical = reference.matches(content)
        if source == canonical_url and not canonical:
            sha1 = hashlib.sha1(content).hexdigest()
            raise DataError(
                f"{raw_path} from {source} contains {len(content):,} bytes with sha1 {sha1}, "
                f"not enwik8's {reference.size:,} bytes with sha1 {reference.sha1}; "
                "the download was deleted, rerun to fetch it again"
            )
        if not content:
            raise DataError(f"input file {raw_path} is empty; pass a non-empty text file")

        if not canonical:
            log.warning(
                "%s is not the canonical enwik8 (%s bytes); splitting it 90%%/5%%/5%% by "
                "bytes. Results on it are not enwik8 results.", raw_path, f"{len(content):,}",
            )
        tokens, manifest = byte_splits_manifest(content)
        manifest = {
            "dataset": "enwik8",
            "source": source,
            "source_file": str(raw_path),
            "source_sha256": file_digest(raw_path),
            "content_bytes": len(content),
            "content_sha256": hashlib.sha256(content).hexdigest(),
            "canonical": canonical,
            "tvq_version": tvq.__version__,
            **manifest,
        }
        manifest = write_splits(out_dir, tokens, manifest)
    except DataError:
        # A download that cannot be prepared would be reused by every rerun.
        if downloaded and raw_path.is_file():
            raw_path.unlink()
            log.info("deleted %s so that a rerun downloads it again", raw_path)
        raise
    for split in SPLITS:
        log.info("%s: %s tokens", split, f"{manifest['splits'][split]['tokens']:,}")
    return manifest


def _cut_at_newline(content: bytes, position: int) -> int:
    """Move a split point to just after the next newline, so no line or character is cut."""
    newline = content.find(b"\n", position)
    return len(content) if newline == -1 else newline + 1


def sentencepiece_splits_manifest(
    content: bytes, vocab_model: Path
) -> tuple[dict, dict[str, Any]]:
    """Split text 90/5/5 at line boundaries and encode each split with SentencePiece."""
    from tvq.data.sentencepiece_vocab import SentencePieceVocab

    spm_vocab = SentencePieceVocab(vocab_model)
    (_, train_stop), (_, validation_stop), _ = split_bounds(len(content))
    cuts = [
        0,
        _cut_at_newline(content, train_stop),
        _cut_at_newline(content, validation_stop),
        len(content),
    ]

    tokens, described = {}, {}
    for index, split in enumerate(SPLITS):
        piece = content[cuts[index] : cuts[index + 1]]
        text = piece.decode("utf-8", errors="replace")
        ids = [spm_vocab.encode(line) for line in text.splitlines(keepends=True)]
        tokens[split] = np.concatenate(ids) if ids else np.zeros(0, spm_vocab.dtype)
        described[split] = {
            "tokens": len(tokens[split]),
            "bytes": len(piece),
            "words": len(piece.split()),
            "byte_range": [cuts[index], cuts[index + 1]],
        }
    manifest = {"vocab": spm_vocab.describe(), "dtype": str(spm_vocab.dtype), "splits": described}
    return tokens, manifest


def prepare_text(
    sources: list[str], out_dir: Path, *, vocab_model: Path | None = None
) -> dict[str, Any]:
    """Prepare splits from local text or XML files, concatenated in order.

    Tokens are bytes, or SentencePiece ids when vocab_model is given, in which case the
    90/5/5 split points move to the next line break.
    """
    if not sources:
        raise DataError("no input files given; pass one or more --source files")
    check_output_dir(out_dir)
    parts = []
    for source in sources:
        if is_url(source):
            raise DataError(f"dataset 'text' reads local files only, got the URL {source}")
        parts.append(read_maybe_compressed(Path(source)))
    content = b"".join(parts)
    if not content:
        raise DataError(f"input files {', '.join(sources)} are empty; pass non-empty text")

    if vocab_model is None:
        tokens, manifest = byte_splits_manifest(content)
    else:
        tokens, manifest = sentencepiece_splits_manifest(content, Path(vocab_model))
    manifest = {
        "dataset": "text",
        "source": list(sources),
        "source_sha256": [file_digest(Path(s)) for s in sources],
        "content_bytes": len(content),
        "content_sha256": hashlib.sha256(content).hexdigest(),
        "canonical": False,
        "tvq_version": tvq.__version__,
        **manifest,
    }
    return write_splits(out_dir, tokens, manifest)
