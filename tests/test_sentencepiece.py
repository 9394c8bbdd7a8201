"""SentencePiece vocabularies: special ids, round trip, text preparation with them."""

import subprocess
import sys

import numpy as np
import pytest

from tvq.data.enwik8 import prepare_text
from tvq.data.errors import DataError
from tvq.data.sentencepiece_vocab import SentencePieceVocab, train_sentencepiece
from tvq.data.splits import load_split
from tvq.data.vocab import EOS_ID, PAD_ID, UNK_ID

SPLITS = ("train", "validation", "test")


def generated_corpus(n_lines=2000, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "river", "ran", "past", "old", "mill", "où", "l'été", "quietly", "stone"]
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "corpus.model"
    return train_sentencepiece([generated_corpus()], path, vocab_size=300, max_sentences=1000)


def test_special_ids_and_round_trip(model_path):
    vocab = SentencePieceVocab(model_path)
    processor = vocab.processor
    assert (processor.pad_id(), processor.eos_id(), processor.unk_id()) == (PAD_ID, EOS_ID, UNK_ID)
    assert processor.bos_id() == -1
    assert vocab.size == 300
    assert vocab.dtype == np.uint16
    text = "the old mill où l'été ran quietly"
    ids = vocab.encode(text)
    assert ids.min() > UNK_ID
    assert vocab.decode(ids) == text
    assert model_path.with_suffix(".vocab").exists()
    assert list(model_path.parent.glob(".vocab-*")) == []


def test_unseen_characters_fall_back_to_bytes(model_path):
    vocab = SentencePieceVocab(model_path)
    assert vocab.decode(vocab.encode("zebra ☃")) == "zebra ☃"


def test_text_prepared_with_vocabulary(tmp_path, model_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_corpus(seed=1))
    manifest = prepare_text([str(corpus)], tmp_path / "out", vocab_model=model_path)
    vocab = SentencePieceVocab(model_path)

    decoded = "".join(vocab.decode(load_split(tmp_path / "out", split)) for split in SPLITS)
    assert decoded == corpus.read_text()
    assert manifest["vocab"]["type"] == "sentencepiece"
    assert manifest["vocab"]["size"] == 300
    ranges = [manifest["splits"][split]["byte_range"] for split in SPLITS]
    assert ranges[0][0] == 0
    assert ranges[2][1] == len(corpus.read_bytes())
    assert corpus.read_bytes()[ranges[1][0] - 1 : ranges[1][0]] == b"\n"


def test_missing_vocabulary(tmp_path):
    with pytest.raises(DataError, match="not found; train one with `tvq vocab`"):
        SentencePieceVocab(tmp_path / "absent.model")


def test_too_small_vocab_size(tmp_path):
    with pytest.raises(DataError, match="vocab_size must exceed"):
        train_sentencepiece(["a b c"], tmp_path / "v.model", vocab_size=3)


def test_cli_trains_on_train_portion(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_corpus(n_lines=900) + "zzzuniquetail " * 200)
    out = tmp_path / "v.model"
    subprocess.run(
        [sys.executable, "-m", "tvq.cli", "vocab", "--source", str(corpus), "--out", str(out),
         "--vocab-size", "300"],
        check=True, capture_output=True,
    )
    pieces = out.with_suffix(".vocab").read_text()
    assert "zzzunique" not in pieces
    assert SentencePieceVocab(out).size == 300
