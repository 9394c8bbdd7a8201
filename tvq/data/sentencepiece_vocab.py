"""Training and loading SentencePiece BPE vocabularies with tvq's special ids.

Every vocabulary uses pad 0, eos 1 and unk 2 and no beginning-of-sequence id, like the
byte vocabulary, so batching and masking need not know which one a dataset uses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from tvq.data.errors import DataError
from tvq.data.vocab import EOS_ID, PAD_ID, UNK_ID, smallest_uint_dtype

log = logging.getLogger(__name__)

# SentencePiece skips longer lines; books and articles have some long paragraphs.
MAX_SENTENCE_BYTES = 16384


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from text.splitlines(keepends=True)


def train_sentencepiece(
    texts: Iterable[str],
    model_path: Path,
    *,
    vocab_size: int,
    max_sentences: int = 10_000_000,
    seed: int = 0,
) -> Path:
    """Train a BPE model on the lines of `texts`, writing model_path (.model) atomically.

    SentencePiece samples at most `max_sentences` lines (in memory), which bounds the
    trainer's memory whatever the corpus size. Characters outside the vocabulary fall
    back to 256 byte pieces, so vocab_size must cover those, the 3 special ids and the
    corpus's characters. The .vocab listing is written beside the model.
    """
    import sentencepiece as spm

    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise DataError(f"vocabulary path {model_path} must end in .model")
    if vocab_size <= 3:
        raise DataError(f"vocab_size must exceed the 3 special ids, got {vocab_size}")
    model_path.parent.mkdir(parents=True, exist_ok=True)

    spm.set_random_generator_seed(seed)
    with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".vocab-") as staging:
        prefix = Path(staging) / model_path.stem
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(texts),
                model_prefix=str(prefix),
                model_type="bpe",
                vocab_size=vocab_size,
                pad_id=PAD_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                bos_id=-1,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                max_sentence_length=MAX_SENTENCE_BYTES,
                byte_fallback=True,
                # Keep text exactly: newlines as their own piece, runs of spaces, and no
                # space added before each line, so decode(encode(text)) == text.
                normalization_rule_name="nfkc",
                user_defined_symbols=["\n"],
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except (RuntimeError, ValueError, TypeError) as error:
            raise DataError(f"SentencePiece training for {model_path} failed: {error}") from None
        os.replace(prefix.with_suffix(".vocab"), model_path.with_suffix(".vocab"))
        os.replace(prefix.with_suffix(".model"), model_path)
    log.info("trained a %d-piece BPE vocabulary: %s", vocab_size, model_path)
    return model_path


class SentencePieceVocab:
    """A trained SentencePiece model checked to use tvq's special ids."""

    def __init__(self, model_path: Path):
        import sentencepiece as spm

        self.path = Path(model_path)
        if not self.path.exists():
            raise DataError(
                f"vocabulary {self.path} not found; train one with `tvq vocab` first"
            )
        if not self.path.is_file():
            raise DataError(f"vocabulary {self.path} is not a file; pass a .model file")
        try:
            self.processor = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as error:
            raise DataError(
                f"vocabulary {self.path} is not a SentencePiece model ({error}); pass the "
                ".model file written by `tvq vocab`"
            ) from None
        processor = self.processor
        ids = (processor.pad_id(), processor.eos_id(), processor.unk_id(), processor.bos_id())
        if ids != (PAD_ID, EOS_ID, UNK_ID, -1):
            raise DataError(
                f"vocabulary {self.path} has pad/eos/unk/bos ids {ids}, expected "
                f"({PAD_ID}, {EOS_ID}, {UNK_ID}, -1); train it with `tvq vocab`"
            )

    @property
    def size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def dtype(self) -> np.dtype:
        return smallest_uint_dtype(self.size)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.processor.encode(text), dtype=self.dtype)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode([int(i) for i in ids if i not in (PAD_ID, EOS_ID)])

    def describe(self) -> dict:
        return {
            "type": "sentencepiece",
            "model": str(self.path),
            "model_sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
            "size": self.size,
            "pad_id": PAD_ID,
            "eos_id": EOS_ID,
            "unk_id": UNK_ID,
        }


