"""Split preparation from local files: token values, manifest, atomic output."""

import bz2
import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tvq.data import vocab
from tvq.data.enwik8 import prepare_enwik8, prepare_text
from tvq.data.errors import DataError
from tvq.data.splits import load_manifest, load_split

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_SAMPLE = SHARED_DATA / "enwiki-sample.xml.bz2"
SPLITS = ("train", "validation", "test")


def write_variants(tmp_path, content):
    """The same content as plain, gzip, bzip2 and zip files."""
    plain = tmp_path / "input.xml"
    plain.write_bytes(content)
    gz = tmp_path / "input.xml.gz"
    gz.write_bytes(gzip.compress(content))
    bz = tmp_path / "input.xml.bz2"
    bz.write_bytes(bz2.compress(content))
    zp = tmp_path / "input.zip"
    with zipfile.ZipFile(zp, "w") as archive:
        archive.writestr("input.xml", content)
    return [plain, gz, bz, zp]


def test_splits_and_manifest_of_known_content(tmp_path):
    content = bytes(range(256)) * 4 + b"one two  three\n"  # 1039 bytes
    source = str(write_variants(tmp_path, content)[0])
    manifest = prepare_enwik8(source, tmp_path / "out", tmp_path / "dl", progress=False)

    train, validation, test = (load_split(tmp_path / "out", s) for s in SPLITS)
    assert (len(train), len(validation), len(test)) == (935, 51, 53)
    assert train.dtype == np.uint16
    np.testing.assert_array_equal(train[:256], np.arange(256) + 3)
    assert vocab.decode_bytes(np.concatenate([train, validation, test])) == content
    assert manifest["canonical"] is False
    assert manifest["splits"]["test"]["words"] == len(content[986:].split())
    assert manifest["splits"]["validation"]["byte_range"] == [935, 986]
    assert manifest["vocab"] == {
        "type": "bytes", "size": 259, "pad_id": 0, "eos_id": 1, "unk_id": 2, "byte_offset": 3,
    }
    manifest_text = (tmp_path / "out" / "manifest.json").read_text()
    assert load_manifest(tmp_path / "out") == json.loads(manifest_text)


def test_compressed_inputs_give_same_tokens(tmp_path):
    content = b"<page>text " * 500
    expected = None
    for index, path in enumerate(write_variants(tmp_path, content)):
        out = tmp_path / f"out{index}"
        manifest = prepare_enwik8(str(path), out, tmp_path / "dl", progress=False)
        tokens = [np.asarray(load_split(out, s)) for s in SPLITS]
        expected = expected or tokens
        for actual, reference in zip(tokens, expected, strict=True):
            np.testing.assert_array_equal(actual, reference)
        assert manifest["content_bytes"] == len(content)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("absent.xml", None, "not found"),
        ("empty.xml", b"", "is empty"),
        ("bad.bz2", b"BZh9garbage", "corrupt"),
        ("truncated.gz", gzip.compress(b"text " * 1000)[:40], "corrupt or truncated"),
        ("empty.zip", b"PK\x05\x06" + b"\x00" * 18, "contains no files"),
        ("data.xz", b"\xfd7zXZ\x00" + b"\x00" * 30, "xz or zstd compressed"),
        (".", None, "not a regular file"),
    ],
)
def test_bad_local_input(tmp_path, name, content, message):
    source = tmp_path / name
    if content is not None:
        source.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare_enwik8(str(source), tmp_path / "out", tmp_path / "dl", progress=False)
    assert not (tmp_path / "out").exists()


def test_zip_with_two_members(tmp_path):
    path = tmp_path / "two.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a", b"aaaa")
        archive.writestr("b", b"bbbb")
    with pytest.raises(DataError, match="exactly one file, found: a, b"):
        prepare_enwik8(str(path), tmp_path / "out", tmp_path / "dl", progress=False)


def test_failed_prepare_keeps_previous_output(tmp_path):
    good = tmp_path / "good.xml"
    good.write_bytes(b"x" * 1000)
    prepare_enwik8(str(good), tmp_path / "out", tmp_path / "dl", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    with pytest.raises(DataError):
        prepare_enwik8(str(tmp_path / "absent"), tmp_path / "out", tmp_path / "dl", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_text_dataset_concatenates_files(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_bytes(b"first file " * 50)
    second.write_bytes(b"second file " * 50)
    manifest = prepare_text([str(first), str(second)], tmp_path / "out")
    tokens = np.concatenate([load_split(tmp_path / "out", s) for s in SPLITS])
    assert vocab.decode_bytes(tokens) == first.read_bytes() + second.read_bytes()
    assert manifest["dataset"] == "text"
    assert len(manifest["source_sha256"]) == 2


@pytest.mark.skipif(
    not SHARED_SAMPLE.exists(), reason=f"{SHARED_SAMPLE} is absent (kept outside the repository)"
)
def test_shared_enwiki_sample(tmp_path):
    manifest = prepare_enwik8(
        str(SHARED_SAMPLE), tmp_path / "out", tmp_path / "dl", progress=False
    )
    sizes = [manifest["splits"][s]["bytes"] for s in SPLITS]
    assert sum(sizes) == 6_089_746
    assert sizes == [5_480_771, 304_487, 304_488]
    assert manifest["canonical"] is False
    assert manifest["source_sha256"] == (
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
    )
    assert manifest["content_sha256"] == (
        "34c1c63050c87cc8477b9ae36b1cb0edf372612c92938b742e579a7109c20fa4"
    )


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tvq.cli", "prepare", "--dataset", "enwik8",
         "--source", str(tmp_path / "absent.zip"), "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"tvq prepare: error: input file {tmp_path / 'absent.zip'} not found; check the path"
    ]
    assert not (tmp_path / "out").exists()


def test_out_dir_with_other_files_is_not_replaced(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_bytes(b"words and more words " * 100)
    notes = tmp_path / "notes.md"
    notes.write_text("keep me")
    with pytest.raises(DataError, match="contains files tvq did not write .*corpus.txt"):
        prepare_text([str(source)], tmp_path)
    assert notes.read_text() == "keep me"
    assert source.exists()


def test_out_dir_that_is_a_file(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_bytes(b"words " * 100)
    target = tmp_path / "afile"
    target.write_text("not a folder")
    with pytest.raises(DataError, match="is a file, not a folder"):
        prepare_text([str(source)], target)
    assert target.read_text() == "not a folder"


def test_vocab_that_is_not_a_model(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_bytes(b"words\n" * 100)
    fake = tmp_path / "fake.model"
    fake.write_text("not a model")
    with pytest.raises(DataError, match="is not a SentencePiece model"):
        prepare_text([str(source)], tmp_path / "out", vocab_model=fake)
    assert not (tmp_path / "out").exists()
