"""Evaluation: every token scored once, metrics against a direct computation, result JSON."""

import json
import math

import numpy as np
import pytest

from tests.runs import TINY_CONFIG, run_tvq, write_corpus
from tvq.data.enwik8 import prepare_text
from tvq.data.sentencepiece_vocab import train_sentencepiece
from tvq.data.splits import load_manifest, load_split
from tvq.data.vocab import EOS_ID
from tvq.evaluation.evaluate import evaluate, metric_name
from tvq.model.transformer import Transformer
from tvq.train.checkpoint import Checkpoints
from tvq.train.config import RunConfig
from tvq.train.errors import CheckpointError
from tvq.train.loop import train
from tvq.train.step import Trainer, make_mesh

# Fields that the README and the pipeline rely on.
RESULT_FIELDS = {
    "dataset", "split", "metric", "value", "scored_tokens", "scored_bytes", "preset",
    "param_count", "checkpoint_step", "input_sha256", "canonical", "wall_time_s",
    "tvq_version", "partial",
}


def trained_run(folder, data_dir, **changes):
    config = RunConfig.from_dict({**TINY_CONFIG, "n_max_step": 6, "n_save_step": 3, **changes})
    train(config, data_dir, folder / "run", progress=False)
    return config, folder / "run"


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bytes")
    # 5% of 24,000 bytes: a test split of 1,200 tokens, not a multiple of 4 x 64.
    source = folder / "corpus.txt"
    source.write_bytes(write_corpus(folder / "words.txt").read_bytes()[:24_000])
    prepare_text([str(source)], folder / "data")
    config, workdir = trained_run(folder, folder / "data")
    return config, folder / "data", workdir


def reference_nats(config, state, tokens):
    """Summed cross-entropy of a split, in float64, from sequences built independently."""
    T = config.model.sequence_len
    model = Transformer(config.model)
    variables = {"params": state["params"], "codebook": state["codebook"]}
    total = 0.0
    for start in range(0, len(tokens), T):
        targets = np.asarray(tokens[start : start + T], np.int64)
        n = len(targets)
        padded = np.zeros(T, np.int64)
        padded[:n] = targets
        inputs = np.concatenate([[EOS_ID], padded[:-1]])[None].astype(np.int32)
        logits, _ = model.apply(variables, inputs)
        logits = np.asarray(logits[0], np.float64)
        log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1))
        log_z += logits.max(-1)
        total += float(np.sum(log_z[:n] - logits[np.arange(n), targets]))
    return total


def test_bits_per_byte_match_a_direct_computation(byte_run, tmp_path):
    config, data_dir, workdir = byte_run
    result = evaluate(workdir, data_dir, "test", tmp_path / "test.json", progress=False)

    tokens = load_split(data_dir, "test")
    assert len(tokens) == 1200
    checkpoints = Checkpoints(workdir / "checkpoints", read_only=True)
    step = checkpoints.best_step()
    state = checkpoints.restore(step, Trainer(config, make_mesh()).abstract_state())
    checkpoints.close()
    nats = reference_nats(config, state, tokens)

    assert result["scored_tokens"] == result["scored_bytes"] == len(tokens) == 1200
    assert result["metric"] == "bits_per_byte"
    assert result["partial"] is False
    assert result["checkpoint_step"] == step
    np.testing.assert_allclose(result["value"], nats / 1200 / math.log(2), rtol=1e-5)
    assert json.loads((tmp_path / "test.json").read_text()) == result
    assert RESULT_FIELDS <= set(result)
    # A "text" dataset has no paper figure to compare with.
    assert result["canonical"] is False
    assert result["paper_value"] is None


def test_partial_evaluation_is_marked(byte_run, tmp_path):
    config, data_dir, workdir = byte_run
    result = evaluate(
        workdir, data_dir, "validation", tmp_path / "v.json", max_tokens=100, progress=False
    )
    assert result["partial"] is True
    assert result["max_tokens"] == 100
    assert result["scored_tokens"] == result["scored_bytes"] == 100
    assert result["split_tokens"] == len(load_split(data_dir, "validation"))
    assert result["paper_value"] is None


def test_command_line_writes_the_result(byte_run, tmp_path):
    _, data_dir, workdir = byte_run
    out = tmp_path / "results" / "test_bpb.json"
    done = run_tvq(
        "evaluate", "--workdir", workdir, "--data-dir", data_dir, "--split", "test",
        "--out", out, "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert f"test bits_per_byte: {result['value']:.4f}" in done.stdout
    assert RESULT_FIELDS <= set(result)


def test_word_perplexity_for_sentencepiece_text(tmp_path):
    source = write_corpus(tmp_path / "corpus.txt", n_words=20_000)
    model = train_sentencepiece(
        [source.read_text()], tmp_path / "vocab.model", vocab_size=400, max_sentences=2000
    )
    prepare_text([str(source)], tmp_path / "data", vocab_model=model)
    trained_run(tmp_path, tmp_path / "data", n_vocab=400)

    result = evaluate(tmp_path / "run", tmp_path / "data", "test", tmp_path / "t.json",
                      progress=False)
    described = load_manifest(tmp_path / "data")["splits"]["test"]
    nats = result["loss_nats_per_token"] * result["scored_tokens"]
    assert result["metric"] == "word_perplexity"
    assert result["scored_tokens"] == described["tokens"]
    assert result["scored_words"] == described["words"] > 0
    np.testing.assert_allclose(result["value"], math.exp(nats / described["words"]), rtol=1e-9)
    np.testing.assert_allclose(
        result["token_perplexity"], math.exp(nats / described["tokens"]), rtol=1e-9
    )
    np.testing.assert_allclose(
        result["bits_per_byte"], nats / described["bytes"] / math.log(2), rtol=1e-9
    )
    # More tokens than words here, so the word-level figure is the larger one.
    assert result["value"] > result["token_perplexity"]


def test_metric_follows_the_dataset():
    bytes_vocab = {"type": "bytes", "size": 259}
    assert metric_name({"dataset": "enwik8", "vocab": bytes_vocab}) == "bits_per_byte"
    assert metric_name({"dataset": "text", "vocab": bytes_vocab}) == "bits_per_byte"
    assert metric_name({"dataset": "imagenet64", "vocab": bytes_vocab}) == "bits_per_dim"
    assert metric_name({"dataset": "pg19", "vocab": bytes_vocab}) == "word_perplexity"
    sentencepiece = {"type": "sentencepiece", "size": 400}
    assert metric_name({"dataset": "text", "vocab": sentencepiece}) == "word_perplexity"


def test_evaluating_without_a_checkpoint_is_an_error(byte_run, tmp_path):
    config, data_dir, _ = byte_run
    with pytest.raises(CheckpointError, match="no checkpoint in .*; run `tvq train`"):
        evaluate(tmp_path / "empty", data_dir, "test", tmp_path / "t.json", config=config)
    assert not (tmp_path / "t.json").exists()
