"""ImageNet 64x64 and PG-19 from a prepared TensorFlow Datasets (TFDS) data dir.

Nothing here downloads, so the datasets must already be built in the TFDS data dir. The
tensorflow_datasets and tensorflow modules are imported inside the functions that read
data, so importing this module works without the `data` extra installed. In
tensorflow-datasets 4.9.10, data stored as tfrecord (the default of
`download_and_prepare`) is read through TensorFlow, and array_record or parquet data
through NumPy data sources, without TensorFlow.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import tvq
from tvq.data import vocab
from tvq.data.errors import DataError
from tvq.data.splits import SPLITS, write_splits

log = logging.getLogger(__name__)

IMAGENET64 = "imagenet_resized/64x64"
IMAGE_SHAPE = (64, 64, 3)
TOKENS_PER_IMAGE = 64 * 64 * 3
# The first 1,200,000 of the 1,281,167 images in the TFDS train split are the training
# set and the other 81,167 the validation set. The TFDS validation split (50,000 images)
# is the test set. Split sizes are from the TFDS catalog page of imagenet_resized.
IMAGENET64_TRAIN_IMAGES = 1_200_000

PG19 = "pg19"

VERSION_DIR = re.compile(r"\d+\.\d+\.\d+")
INSTALL_HINT = "install the data extra: pip install -e '.[data]'"



def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DataError(
            f"reading TFDS datasets needs tensorflow_datasets ({error}); {INSTALL_HINT}"
        ) from None
    return tfds


def _import_tensorflow(dataset: str, file_format: str) -> Any:
    """Import TensorFlow with every GPU hidden from it, so it leaves GPU memory to JAX."""
    try:
        import tensorflow as tf
    except ImportError as error:
        raise DataError(
            f"reading {dataset} stored as {file_format} needs TensorFlow ({error}); "
            f"{INSTALL_HINT}"
        ) from None
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as error:
        # TensorFlow rejects the change once its runtime has started in this process.
        log.info("TensorFlow is already initialised, so its GPUs stay visible: %s", error)
    return tf


def load_builder(name: str, data_dir: Path | str | None) -> Any:
    """Load the TFDS builder of a dataset that is already built in data_dir.

    data_dir None means the TFDS default ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
    A dataset missing from data_dir raises DataError and is never downloaded.
    """
    tfds = _import_tfds()
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"TFDS data dir {data_dir} is a file; pass the folder that contains {name}")
    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
        if builder.is_prepared():
            # Reading the split sizes parses dataset_info.json, which may be damaged.
            _ = {split: info.num_examples for split, info in builder.info.splits.items()}
            required = ("train", "validation", "test") if name == PG19 else ("train", "validation")
            missing = [split for split in required if split not in builder.info.splits]
            if missing:
                raise DataError(
                    f"TFDS dataset {name} in {data_dir} lacks split(s) {', '.join(missing)}; "
                    "rebuild it with download_and_prepare()"
                )
            return builder
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - TFDS raises many types for damaged metadata
        raise DataError(
            f"TFDS dataset {name} in data dir {data_dir} cannot be loaded "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "rebuild it with download_and_prepare() or pass another --tfds-data-dir"
        ) from None

    root = Path(builder.data_dir_root)
    version = str(builder.info.version)
    # TFDS stores dataset "a/b" at version v in root/a/b/v.
    found = sorted(p.name for p in (root / name).glob("*") if VERSION_DIR.fullmatch(p.name))
    contains = f" (it contains versions {', '.join(found)} only)" if found else ""
    # NOTE: the command-line `tfds build` of tensorflow-datasets 4.9.10 fails to start
    # without apache-beam installed, so the fix names the Python call instead.
    raise DataError(
        f"TFDS dataset {name} version {version} not found in data dir {root}{contains}; "
        f"build it there with `python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='{root}').download_and_prepare()\"`, "
        f"or pass the data_dir that contains {name}/{version}"
    )


def iter_examples(builder: Any, split: str) -> Iterator[dict[str, Any]]:
    """Yield the examples of a TFDS split, as NumPy values, in the order they are stored.

    split may be a TFDS slice such as "train[:1000]". Reading in storage order, with one
    file open at a time, makes "the first n examples" the same for every file format.
    """
    tfds = _import_tfds()
    file_format = builder.info.file_format
    if file_format in tfds.core.FileFormat.with_random_access():
        yield from builder.as_data_source(split)
        return

    _import_tensorflow(builder.info.full_name, file_format.value)
    dataset = builder.as_dataset(
        split, shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1)
    )
    yield from tfds.as_numpy(dataset)


def _write_tokens(path: Path, dtype: np.dtype, pieces: Iterable[np.ndarray]) -> np.ndarray:
    """Write the token arrays one after another to a raw file and memory-map it.

    A split is written piece by piece, so it never has to fit in memory.
    """
    count = 0
    with path.open("wb") as handle:
        for piece in pieces:
            handle.write(np.asarray(piece).astype(dtype, copy=False).tobytes())
            count += len(piece)
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _scratch_dir(out_dir: Path) -> tempfile.TemporaryDirectory:
    """Return a temporary folder beside out_dir, deleted on exit whether or not it fails."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.tokens-", dir=out_dir.parent)


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise DataError(f"{name} must be a positive integer or None, got {value}")


def imagenet64_source_splits(
    n_available: int, n_available_test: int, n_train: int, max_images: int | None
) -> dict[str, str]:
    """Map each split to its TFDS slice of imagenet_resized/64x64.

    n_available and n_available_test are the sizes of the TFDS train and validation
    splits. Train is the first n_train images of the TFDS train split, validation the
    rest of it and test the TFDS validation split, each cut to max_images if given.
    """
    if not 0 < n_train < n_available:
        raise DataError(
            f"n_train must be between 1 and {n_available - 1:,} because the TFDS train split "
            f"of {IMAGENET64} has {n_available:,} images and the rest form the validation "
            f"split, got {n_train:,}"
        )
    _check_positive("max_images", max_images)
    cap = max_images if max_images is not None else n_available
    return {
        "train": f"train[:{min(n_train, cap)}]",
        "validation": f"train[{n_train}:{min(n_available, n_train + cap)}]",
        "test": f"validation[:{min(n_available_test, cap)}]",
    }


def _image_tokens(builder: Any, source_split: str) -> Iterator[np.ndarray]:
    """Yield each image flattened row by row, column by column, then channel, plus 3."""
    for index, example in enumerate(iter_examples(builder, source_split)):
        image = np.asarray(example["image"])
        if image.shape != IMAGE_SHAPE or image.dtype != np.uint8:
            raise DataError(
                f"image {index} of {IMAGENET64} split {source_split} is {image.dtype} "
                f"{list(image.shape)}, expected uint8 {list(IMAGE_SHAPE)}; rebuild the "
                "dataset with tensorflow_datasets"
            )
        yield vocab.encode_bytes(image.reshape(-1))


def prepare_imagenet64(
    out_dir: Path,
    *,
    data_dir: Path | str | None = None,
    n_train: int = IMAGENET64_TRAIN_IMAGES,
    max_images: int | None = None,
) -> dict[str, Any]:
    """Prepare ImageNet 64x64 byte splits in out_dir from TFDS imagenet_resized/64x64.

    Each image is 12,288 tokens, its uint8 pixels in row-major (row, column, channel)
    order plus 3, and each split file is its images one after another. max_images cuts
    every split for smoke runs. Only n_train 1,200,000 without max_images is recorded
    as canonical. Token files are staged beside out_dir first, which needs free disk
    for about twice their size (2 bytes per token).
    """
    out_dir = Path(out_dir)
    builder = load_builder(IMAGENET64, data_dir)
    available = builder.info.splits
    source_splits = imagenet64_source_splits(
        available["train"].num_examples, available["validation"].num_examples,
        n_train, max_images,
    )

    dtype = vocab.smallest_uint_dtype(vocab.BYTE_VOCAB_SIZE)
    described = {}
    with _scratch_dir(out_dir) as scratch:
        tokens = {}
        for split in SPLITS:
            log.info("reading %s %s", IMAGENET64, source_splits[split])
            tokens[split] = _write_tokens(
                Path(scratch) / f"{split}.raw", dtype, _image_tokens(builder, source_splits[split])
            )
            described[split] = {
                "tokens": len(tokens[split]),
                "images": len(tokens[split]) // TOKENS_PER_IMAGE,
                "source_split": source_splits[split],
            }

        manifest = {
            "dataset": "imagenet64",
            "source": f"tfds:{IMAGENET64}",
            "source_version": str(builder.info.version),
            "data_dir": str(builder.data_dir_root),
            "canonical": n_train == IMAGENET64_TRAIN_IMAGES and max_images is None,
            "n_train": n_train,
            "max_images": max_images,
            "tvq_version": tvq.__version__,
            "image_shape": list(IMAGE_SHAPE),
            "tokens_per_image": TOKENS_PER_IMAGE,
            "vocab": vocab.byte_vocab_manifest(),
            "dtype": str(dtype),
            "splits": described,
        }
        manifest = write_splits(out_dir, tokens, manifest)

    for split in SPLITS:
        log.info("%s: %s images", split, f"{described[split]['images']:,}")
    return manifest


def _pg19_source_split(builder: Any, split: str, max_books: int | None) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    _check_positive("max_books", max_books)
    if max_books is None:
        return split
    return f"{split}[:{min(max_books, builder.info.splits[split].num_examples)}]"


def _iter_books(builder: Any, source_split: str) -> Iterator[tuple[int, bytes]]:
    """Yield (book_id, book_text as UTF-8 bytes) for each book of a TFDS pg19 split."""
    for example in iter_examples(builder, source_split):
        yield int(example["book_id"]), bytes(example["book_text"])


def _decode_book(book_id: int, text: bytes, source_split: str) -> str:
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"book {book_id} of {PG19} split {source_split} is not valid UTF-8 ({error}); "
            "rebuild the dataset from the PG-19 text files, or prepare byte tokens, which "
            "take any bytes"
        ) from None


def iter_pg19_texts(
    split: str, data_dir: Path | str | None = None, max_books: int | None = None
) -> Iterator[str]:
    """Return an iterator over the book texts of a TFDS pg19 split, in stored order.

    A missing dataset or a bad argument raises DataError here, before iteration starts.
    """
    builder = load_builder(PG19, data_dir)
    source_split = _pg19_source_split(builder, split, max_books)

    def texts() -> Iterator[str]:
        for book_id, text in _iter_books(builder, source_split):
            yield _decode_book(book_id, text, source_split)

    return texts()


def prepare_pg19(
    out_dir: Path,
    *,
    data_dir: Path | str | None = None,
    vocab_model: Path | str | None = None,
    max_books: int | None = None,
) -> dict[str, Any]:
    """Prepare PG-19 splits in out_dir from TFDS pg19, each book followed by EOS.

    Tokens are bytes plus 3, or SentencePiece ids when vocab_model (a .model file with
    tvq's special ids) is given. Per split the manifest records tokens, books, the UTF-8
    bytes of the book texts and their words: runs of non-whitespace separated by ASCII
    whitespace, the denominator of word-level perplexity. max_books cuts every split for
    smoke runs. Token files are staged beside out_dir first, which needs free disk for
    about twice their size.
    """
    out_dir = Path(out_dir)
    if vocab_model is None:
        encoder = None
        vocab_manifest = vocab.byte_vocab_manifest()
        dtype = vocab.smallest_uint_dtype(vocab.BYTE_VOCAB_SIZE)
    else:
        from tvq.data.sentencepiece_vocab import SentencePieceVocab

        encoder = SentencePieceVocab(Path(vocab_model))
        vocab_manifest = encoder.describe()
        dtype = encoder.dtype
    builder = load_builder(PG19, data_dir)
    source_splits = {split: _pg19_source_split(builder, split, max_books) for split in SPLITS}
    eos = np.array([vocab.EOS_ID], dtype)

    def book_tokens(source_split: str, counts: dict[str, int]) -> Iterator[np.ndarray]:
        for book_id, text in _iter_books(builder, source_split):
            counts["books"] += 1
            counts["bytes"] += len(text)
            counts["words"] += len(text.split())
            if encoder is None:
                yield vocab.encode_bytes(text)
            else:
                yield encoder.encode(_decode_book(book_id, text, source_split))
            yield eos

    described = {}
    with _scratch_dir(out_dir) as scratch:
        tokens = {}
        for split in SPLITS:
            log.info("reading %s %s", PG19, source_splits[split])
            counts = {"books": 0, "bytes": 0, "words": 0}
            tokens[split] = _write_tokens(
                Path(scratch) / f"{split}.raw", dtype, book_tokens(source_splits[split], counts)
            )
            described[split] = {
                "tokens": len(tokens[split]),
                **counts,
                "source_split": source_splits[split],
            }

        manifest = {
            "dataset": "pg19",
            "source": f"tfds:{PG19}",
            "source_version": str(builder.info.version),
            "data_dir": str(builder.data_dir_root),
            "canonical": max_books is None,
            "max_books": max_books,
            "tvq_version": tvq.__version__,
            "vocab": vocab_manifest,
            "dtype": str(dtype),
            "splits": described,
        }
        manifest = write_splits(out_dir, tokens, manifest)

    for split in SPLITS:
        log.info("%s: %s tokens", split, f"{described[split]['tokens']:,}")
    return manifest
