"""ImageNet64 and PG-19 preparation from TFDS data dirs built here by real TFDS builders.

The builders subclass TFDS's own imagenet_resized and pg19 builders, so the data dirs
have the real names, versions and features, and replace only the download with small
generated examples. They are built in both the tfrecord and the array_record format,
which TFDS reads through different code (tf.data and NumPy data sources).
"""

import hashlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tvq.data import vocab
from tvq.data.errors import DataError
from tvq.data.splits import load_split
from tvq.data.tfds_sources import (
    IMAGE_SHAPE,
    TOKENS_PER_IMAGE,
    iter_pg19_texts,
    prepare_imagenet64,
    prepare_pg19,
)

SPLITS = ("train", "validation", "test")
TFDS_FORMATS = ("tfrecord", "array_record")
BYTE_VOCAB = {
    "type": "bytes", "size": 259, "pad_id": 0, "eos_id": 1, "unk_id": 2, "byte_offset": 3,
}
# Fixed PG-19 validation books: 7 and 4 words when split at ASCII whitespace.
VALIDATION_BOOKS = ["It was a dark and stormy night.\n", "  Où   l'été\tfinit\n\nici. "]


def import_tfds_for_building():
    """Return tensorflow_datasets, skipping the test unless TensorFlow is installed too.

    Writing tfrecord files and encoding images as PNG both go through TensorFlow.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")
    return tfds


def small_builder_class(tfds, dataset_name, examples):
    """Subclass TFDS's builder of dataset_name to write examples ({split: [(key, example)]})."""
    base = tfds.builder_cls(dataset_name)

    class SmallBuilder(base, skip_registration=True):
        name = dataset_name
        # TFDS reads README and citations from the folder of the builder's module, which
        # would be tests/ for this class.
        pkg_dir_path = Path(inspect.getfile(base)).parent

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in examples}

        def _generate_examples(self, split):
            yield from examples[split]

    return SmallBuilder


def build(tfds, name, examples, data_dir, file_format, config=None):
    builder_class = small_builder_class(tfds, name, examples)
    builder = builder_class(config=config, data_dir=str(data_dir), file_format=file_format)
    # Two shards per split, so reading in stored order has to cross a file boundary.
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=2))


def stored_order(tfds, name, data_dir, split, field):
    """Read `field` of every example in stored order through TFDS's NumPy data source."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    return [int(example[field]) for example in builder.as_data_source(split)]


def image_tokens(images):
    return images.reshape(-1).astype(np.uint16) + 3


def book_tokens(books):
    pieces = [np.append(vocab.encode_bytes(book), vocab.EOS_ID) for book in books]
    return np.concatenate(pieces).astype(np.uint16)


def generated_book(rng, n_lines):
    words = ["the", "river", "ran", "past", "old", "mill", "où", "l'été", "quietly", "stone"]
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


def files_beside(out_dir):
    return sorted(p.name for p in out_dir.parent.iterdir())


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """Random images in both formats, with the images of each split in stored order."""
    tfds = import_tfds_for_building()
    rng = np.random.default_rng(0)
    images = {
        "train": rng.integers(0, 256, (7, *IMAGE_SHAPE), dtype=np.uint8),
        "validation": rng.integers(0, 256, (3, *IMAGE_SHAPE), dtype=np.uint8),
    }
    examples = {
        split: [(f"{split}-{label}", {"image": image, "label": label})
                for label, image in enumerate(split_images)]
        for split, split_images in images.items()
    }
    root = tmp_path_factory.mktemp("tfds-imagenet")
    data_dirs = {}
    for file_format in TFDS_FORMATS:
        data_dirs[file_format] = root / file_format
        build(tfds, "imagenet_resized", examples, data_dirs[file_format], file_format, "64x64")

    stored = {}
    for split, split_images in images.items():
        labels = stored_order(
            tfds, "imagenet_resized/64x64", data_dirs["array_record"], split, "label"
        )
        stored[split] = split_images[labels]
    return SimpleNamespace(data_dirs=data_dirs, stored=stored)


@pytest.fixture(scope="module")
def pg19(tmp_path_factory):
    """Books in both formats, with the texts of each split in stored order."""
    tfds = import_tfds_for_building()
    rng = np.random.default_rng(0)
    books = {
        # Two shards of 20 books. TFDS's default ReadConfig (4.9.10) interleaves shards in
        # blocks of 16 examples, which would change the order of these books.
        "train": [generated_book(rng, 5) for _ in range(40)],
        "validation": VALIDATION_BOOKS,
        "test": [generated_book(rng, 20) for _ in range(3)],
    }
    book_ids = {"train": 100, "validation": 200, "test": 300}
    examples = {}
    for split, texts in books.items():
        examples[split] = []
        for index, text in enumerate(texts):
            book_id = book_ids[split] + index
            example = {
                "book_text": text, "book_id": book_id, "book_title": f"Book {book_id}",
                "publication_date": "1900", "book_link": f"https://example.org/{book_id}",
            }
            examples[split].append((book_id, example))
    root = tmp_path_factory.mktemp("tfds-pg19")
    data_dirs = {}
    for file_format in TFDS_FORMATS:
        data_dirs[file_format] = root / file_format
        build(tfds, "pg19", examples, data_dirs[file_format], file_format)

    stored = {}
    for split, texts in books.items():
        ids = stored_order(tfds, "pg19", data_dirs["array_record"], split, "book_id")
        stored[split] = [texts[book_id - book_ids[split]] for book_id in ids]
    return SimpleNamespace(data_dirs=data_dirs, stored=stored)


@pytest.fixture(scope="module")
def vocab_model(tmp_path_factory):
    from tvq.data.sentencepiece_vocab import train_sentencepiece

    text = generated_book(np.random.default_rng(1), 2000)
    path = tmp_path_factory.mktemp("vocab") / "pg19.model"
    return train_sentencepiece([text], path, vocab_size=300, max_sentences=2000)


def test_import_skips_tensorflow():
    code = (
        "import sys, tvq.data.tfds_sources; "
        "print([m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("file_format", TFDS_FORMATS)
def test_imagenet_pixels_and_splits(tmp_path, imagenet, file_format):
    out = tmp_path / "out"
    manifest = prepare_imagenet64(out, data_dir=imagenet.data_dirs[file_format], n_train=5)
    train, validation, test = (load_split(out, split) for split in SPLITS)
    stored_train = imagenet.stored["train"]

    # Row-major flattening: a pixel's 3 channels are adjacent, then the next column,
    # then the next row (64 pixels, 192 tokens, further on).
    first = stored_train[0].astype(np.uint16)
    np.testing.assert_array_equal(train[0:3], first[0, 0] + 3)
    np.testing.assert_array_equal(train[3:6], first[0, 1] + 3)
    np.testing.assert_array_equal(train[192:195], first[1, 0] + 3)
    np.testing.assert_array_equal(train[TOKENS_PER_IMAGE - 3 : TOKENS_PER_IMAGE], first[63, 63] + 3)

    assert train.dtype == np.uint16
    np.testing.assert_array_equal(train, image_tokens(stored_train[:5]))
    np.testing.assert_array_equal(validation, image_tokens(stored_train[5:]))
    np.testing.assert_array_equal(test, image_tokens(imagenet.stored["validation"]))

    assert {split: manifest["splits"][split]["images"] for split in SPLITS} == {
        "train": 5, "validation": 2, "test": 3,
    }
    assert manifest["splits"]["train"]["tokens"] == 5 * 12_288
    assert manifest["splits"]["validation"]["source_split"] == "train[5:7]"
    assert manifest["splits"]["test"]["source_split"] == "validation[:3]"
    assert manifest["dataset"] == "imagenet64"
    assert manifest["source"] == "tfds:imagenet_resized/64x64"
    assert manifest["data_dir"] == str(imagenet.data_dirs[file_format])
    assert manifest["canonical"] is False
    assert manifest["n_train"] == 5
    assert manifest["max_images"] is None
    assert manifest["vocab"] == BYTE_VOCAB
    assert manifest["dtype"] == "uint16"


def test_imagenet_max_images_caps_splits(tmp_path, imagenet):
    out = tmp_path / "out"
    manifest = prepare_imagenet64(
        out, data_dir=imagenet.data_dirs["array_record"], n_train=4, max_images=2
    )
    stored_train = imagenet.stored["train"]
    np.testing.assert_array_equal(load_split(out, "train"), image_tokens(stored_train[:2]))
    np.testing.assert_array_equal(load_split(out, "validation"), image_tokens(stored_train[4:6]))
    np.testing.assert_array_equal(
        load_split(out, "test"), image_tokens(imagenet.stored["validation"][:2])
    )
    assert [manifest["splits"][split]["images"] for split in SPLITS] == [2, 2, 2]
    assert manifest["max_images"] == 2
    assert manifest["canonical"] is False


@pytest.mark.parametrize("n_train", [0, 7, 8])
def test_imagenet_n_train_out_of_range(tmp_path, imagenet, n_train):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="n_train must be between 1 and 6 because"):
        prepare_imagenet64(out, data_dir=imagenet.data_dirs["array_record"], n_train=n_train)
    assert not out.exists()
    assert files_beside(out) == []


def test_imagenet_rejects_zero_max_images(tmp_path, imagenet):
    with pytest.raises(DataError, match="max_images must be a positive integer or None, got 0"):
        prepare_imagenet64(
            tmp_path / "out", data_dir=imagenet.data_dirs["array_record"], n_train=4,
            max_images=0,
        )


@pytest.mark.parametrize(
    "prepare, name", [(prepare_imagenet64, "imagenet_resized/64x64"), (prepare_pg19, "pg19")]
)
def test_missing_dataset_names_fix(tmp_path, prepare, name):
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path / "tensorflow_datasets"
    version = str(tfds.builder(name, data_dir=str(data_dir)).info.version)
    out = tmp_path / "out"
    with pytest.raises(DataError) as raised:
        prepare(out, data_dir=data_dir)

    message = str(raised.value)
    assert f"TFDS dataset {name} version {version} not found in data dir {data_dir};" in message
    assert f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()" in message
    assert "contains versions" not in message
    assert "\n" not in message
    assert not out.exists()


def test_missing_version_lists_found_ones(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path / "tensorflow_datasets"
    (data_dir / "pg19" / "0.0.9").mkdir(parents=True)
    (data_dir / "pg19" / "incomplete.ABC_0.1.1").mkdir()
    with pytest.raises(DataError, match=r"\(it contains versions 0\.0\.9 only\)"):
        prepare_pg19(tmp_path / "out", data_dir=data_dir)


@pytest.mark.parametrize("file_format", TFDS_FORMATS)
def test_pg19_bytes_with_eos_after_each_book(tmp_path, pg19, file_format):
    out = tmp_path / "out"
    manifest = prepare_pg19(out, data_dir=pg19.data_dirs[file_format])

    for split in SPLITS:
        books = [text.encode() for text in pg19.stored[split]]
        tokens = load_split(out, split)
        assert tokens.dtype == np.uint16
        np.testing.assert_array_equal(tokens, book_tokens(books))
        assert tokens[-1] == vocab.EOS_ID
        assert int(np.sum(tokens == vocab.EOS_ID)) == len(books)

        described = manifest["splits"][split]
        assert described["books"] == len(books)
        assert described["bytes"] == sum(len(book) for book in books)
        assert described["words"] == sum(len(book.split()) for book in books)
        assert described["tokens"] == described["bytes"] + described["books"]
        assert described["source_split"] == split

    validation_bytes = sum(len(text.encode()) for text in VALIDATION_BOOKS)
    assert manifest["splits"]["validation"]["words"] == 11
    assert manifest["splits"]["validation"]["bytes"] == validation_bytes
    assert manifest["dataset"] == "pg19"
    assert manifest["source"] == "tfds:pg19"
    assert manifest["data_dir"] == str(pg19.data_dirs[file_format])
    assert manifest["canonical"] is True
    assert manifest["max_books"] is None
    assert manifest["vocab"] == BYTE_VOCAB
    assert manifest["dtype"] == "uint16"


def test_pg19_sentencepiece_tokens_decode_to_books(tmp_path, pg19, vocab_model):
    from tvq.data.sentencepiece_vocab import SentencePieceVocab

    out = tmp_path / "out"
    data_dir = pg19.data_dirs["tfrecord"]
    manifest = prepare_pg19(out, data_dir=data_dir, vocab_model=vocab_model)
    spm_vocab = SentencePieceVocab(vocab_model)

    tokens = np.asarray(load_split(out, "test"))
    assert tokens.dtype == np.uint16
    assert tokens[-1] == vocab.EOS_ID
    ends = np.flatnonzero(tokens == vocab.EOS_ID)
    assert len(ends) == len(pg19.stored["test"])
    books = [spm_vocab.decode(piece) for piece in np.split(tokens, ends[:-1] + 1)]
    assert books == pg19.stored["test"]

    bytes_manifest = prepare_pg19(tmp_path / "bytes", data_dir=data_dir)
    for split in SPLITS:
        for count in ("books", "bytes", "words"):
            assert manifest["splits"][split][count] == bytes_manifest["splits"][split][count]
    assert manifest["vocab"]["type"] == "sentencepiece"
    assert manifest["vocab"]["model"] == str(vocab_model)
    assert manifest["vocab"]["model_sha256"] == hashlib.sha256(vocab_model.read_bytes()).hexdigest()
    assert manifest["vocab"]["size"] == 300
    assert manifest["dtype"] == "uint16"


def test_pg19_max_books_caps_splits(tmp_path, pg19):
    out = tmp_path / "out"
    manifest = prepare_pg19(out, data_dir=pg19.data_dirs["array_record"], max_books=1)
    for split in SPLITS:
        first = pg19.stored[split][0].encode()
        np.testing.assert_array_equal(load_split(out, split), book_tokens([first]))
        assert manifest["splits"][split]["books"] == 1
        assert manifest["splits"][split]["source_split"] == f"{split}[:1]"
    assert manifest["max_books"] == 1
    assert manifest["canonical"] is False


def test_iter_pg19_texts_in_stored_order(pg19):
    data_dir = pg19.data_dirs["tfrecord"]
    texts = list(iter_pg19_texts("train", data_dir=data_dir))
    assert all(isinstance(text, str) for text in texts)
    assert texts == pg19.stored["train"]
    first = list(iter_pg19_texts("validation", data_dir, max_books=1))
    assert first == pg19.stored["validation"][:1]


def test_iter_pg19_texts_checks_arguments_early(pg19):
    data_dir = pg19.data_dirs["array_record"]
    with pytest.raises(DataError, match="unknown split 'dev'; choose one of train, validation"):
        iter_pg19_texts("dev", data_dir)
    with pytest.raises(DataError, match="max_books must be a positive integer or None, got 0"):
        iter_pg19_texts("train", data_dir, max_books=0)


def test_pg19_failure_keeps_previous_output(tmp_path, vocab_model):
    tfds = import_tfds_for_building()
    bad_text = b"caf\xe9 in Latin-1\n"
    examples = {}
    for book_id, split in enumerate(SPLITS):
        text = bad_text if split == "test" else b"plain text\n"
        example = {
            "book_text": text, "book_id": book_id, "book_title": "", "publication_date": "",
            "book_link": "",
        }
        examples[split] = [(book_id, example)]
    data_dir = tmp_path / "tensorflow_datasets"
    builder_class = small_builder_class(tfds, "pg19", examples)
    builder_class(data_dir=str(data_dir), file_format="array_record").download_and_prepare()

    out = tmp_path / "prepared" / "out"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("{}\n")
    with pytest.raises(DataError, match="book 2 of pg19 split test is not valid UTF-8"):
        prepare_pg19(out, data_dir=data_dir, vocab_model=vocab_model)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert (out / "manifest.json").read_text() == "{}\n"
    assert files_beside(out) == ["out"]

    # Byte tokens need no decoding, so the same book prepares without a vocabulary.
    manifest = prepare_pg19(out, data_dir=data_dir)
    assert manifest["splits"]["test"]["bytes"] == len(bad_text)
    np.testing.assert_array_equal(load_split(out, "test"), book_tokens([bad_text]))


def test_array_record_reading_skips_tensorflow(tmp_path, imagenet, pg19):
    code = textwrap.dedent(
        f"""
        import sys
        from tvq.data.tfds_sources import prepare_imagenet64, prepare_pg19
        prepare_imagenet64({str(tmp_path / 'images')!r}, n_train=5,
                           data_dir={str(imagenet.data_dirs['array_record'])!r})
        prepare_pg19({str(tmp_path / 'books')!r}, data_dir={str(pg19.data_dirs['array_record'])!r})
        print('tensorflow' in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
