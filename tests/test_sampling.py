"""Sampling: the token filters on hand-made logits, and `tvq sample` end to end."""

import json
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpimg

from tests.runs import TINY_CONFIG, run_tvq, tvq_command, write_corpus
from tvq.data.enwik8 import prepare_text
from tvq.sampling.filters import filter_logits, sample_tokens
from tvq.sampling.images import GAP_PIXELS
from tvq.train.config import RunConfig
from tvq.train.loop import train

PROBS = np.array([0.05, 0.5, 0.1, 0.3, 0.05])


def hand_made_logits(batch_size=1):
    return jnp.tile(jnp.log(jnp.asarray(PROBS, jnp.float32)), (batch_size, 1))


def kept(logits):
    return set(np.flatnonzero(np.isfinite(np.asarray(logits[0]))))


def draw_frequencies(logits, n, **settings):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draw = jax.vmap(lambda key: sample_tokens(key, logits, **settings)[0])
    tokens = np.asarray(draw(keys))
    return np.bincount(tokens, minlength=logits.shape[-1]) / n


def test_top_k_keeps_the_k_most_likely():
    assert kept(filter_logits(hand_made_logits(), 1, 1.0)) == {1}
    assert kept(filter_logits(hand_made_logits(), 2, 1.0)) == {1, 3}
    assert kept(filter_logits(hand_made_logits(), 0, 1.0)) == {0, 1, 2, 3, 4}
    assert kept(filter_logits(hand_made_logits(), 99, 1.0)) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_sufficient_set():
    assert kept(filter_logits(hand_made_logits(), 0, 0.4)) == {1}
    # 0.5 + 0.3 = 0.8 covers 0.75 but not 0.85.
    assert kept(filter_logits(hand_made_logits(), 0, 0.75)) == {1, 3}
    assert kept(filter_logits(hand_made_logits(), 0, 0.85)) == {1, 3, 2}
    assert kept(filter_logits(hand_made_logits(), 0, 1.0)) == {0, 1, 2, 3, 4}
    # The most likely token survives the smallest p.
    assert kept(filter_logits(hand_made_logits(), 0, 1e-9)) == {1}


def test_top_p_applies_after_top_k():
    # Renormalised over {1, 3}, token 1 has 0.625, which covers p = 0.6.
    assert kept(filter_logits(hand_made_logits(), 2, 0.6)) == {1}
    assert kept(filter_logits(hand_made_logits(), 2, 0.7)) == {1, 3}


def test_filters_work_per_row():
    logits = jnp.stack([jnp.log(jnp.asarray(PROBS)), jnp.log(jnp.asarray(PROBS[::-1]))])
    filtered = np.asarray(filter_logits(logits, 1, 1.0))
    assert np.flatnonzero(np.isfinite(filtered[0])).tolist() == [1]
    assert np.flatnonzero(np.isfinite(filtered[1])).tolist() == [3]


def test_top_p_one_keeps_every_token():
    # float32 cumulative sums over many tokens reach 1 before the last rank.
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 32_000)) * 3
    assert np.isfinite(np.asarray(filter_logits(logits, 0, 1.0))).all()


def test_draws_stay_below_vocab_size():
    # The model has 5 outputs but the data only 3 ids; id 1 is the likeliest overall.
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    draw = jax.vmap(lambda key: sample_tokens(key, hand_made_logits(), 1.0, 0, 1.0, 3)[0])
    tokens = np.asarray(draw(keys))
    assert tokens.max() <= 2
    assert set(tokens.tolist()) == {0, 1, 2}


def test_temperature_zero_is_greedy():
    tokens = sample_tokens(jax.random.PRNGKey(3), hand_made_logits(4), 0.0, 0, 1.0)
    np.testing.assert_array_equal(tokens, [1, 1, 1, 1])


def test_draws_follow_the_tempered_distribution():
    frequencies = draw_frequencies(hand_made_logits(), 20_000, temperature=1.0, top_k=0, top_p=1.0)
    np.testing.assert_allclose(frequencies, PROBS, atol=0.015)

    tempered = PROBS**0.5 / np.sum(PROBS**0.5)
    frequencies = draw_frequencies(hand_made_logits(), 20_000, temperature=2.0, top_k=0, top_p=1.0)
    np.testing.assert_allclose(frequencies, tempered, atol=0.015)


def test_filtered_tokens_are_never_drawn():
    frequencies = draw_frequencies(hand_made_logits(), 5_000, temperature=1.0, top_k=2, top_p=1.0)
    assert frequencies[[0, 2, 4]].sum() == 0
    np.testing.assert_allclose(frequencies[1], 0.5 / 0.8, atol=0.03)


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A tiny byte-level model trained for a few steps, and its data."""
    folder = tmp_path_factory.mktemp("sample")
    source = folder / "corpus.txt"
    source.write_bytes(write_corpus(folder / "words.txt").read_bytes()[:24_000])
    prepare_text([str(source)], folder / "data")
    config = RunConfig.from_dict({**TINY_CONFIG, "n_max_step": 6, "n_save_step": 3})
    train(config, folder / "data", folder / "run", progress=False)
    return folder / "data", folder / "run"


def sample_command(byte_run, out, *options):
    data_dir, workdir = byte_run
    return run_tvq(
        "sample", "--workdir", workdir, "--data-dir", data_dir, "--out", out, "--no-progress",
        *options,
    )


def test_sample_writes_text_reproducibly(byte_run, tmp_path):
    # The prompt (200 bytes) is longer than the model's sequence_len of 64.
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the city of the world was known for its university " * 4)
    options = ["--num-tokens", "40", "--prompt-file", prompt, "--num-samples", "3",
               "--top-p", "0.9", "--seed", "7"]

    first = sample_command(byte_run, tmp_path / "a.txt", *options)
    assert first.returncode == 0, first.stderr
    second = sample_command(byte_run, tmp_path / "b.txt", *options)
    assert second.returncode == 0, second.stderr
    other_seed = sample_command(byte_run, tmp_path / "c.txt", *options[:-1], "8")
    assert other_seed.returncode == 0, other_seed.stderr

    text = (tmp_path / "a.txt").read_text()
    assert text == (tmp_path / "b.txt").read_text()
    assert text != (tmp_path / "c.txt").read_text()
    assert [line for line in text.splitlines() if line.startswith("=== sample")] == [
        "=== sample 1 of 3 ===", "=== sample 2 of 3 ===", "=== sample 3 of 3 ===",
    ]
    assert "3 x 40 tokens" in first.stdout


def test_sample_without_prompt(byte_run, tmp_path):
    result = sample_command(byte_run, tmp_path / "s.txt", "--num-tokens", "300",
                            "--temperature", "0")
    assert result.returncode == 0, result.stderr
    # 300 byte tokens, minus any special ids the model drew, in one sample.
    text = (tmp_path / "s.txt").read_bytes()
    assert 0 < len(text) <= 300 * 3 + 1
    assert not text.startswith(b"===")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--num-tokens", "-5"], "--num-tokens must be at least 1, got -5"),
        (["--num-tokens", "5", "--num-samples", "0"], "--num-samples must be at least 1"),
        (["--num-tokens", "5", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--num-tokens", "5", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--num-tokens", "5", "--top-k", "-1"], "--top-k must be 0 (off) or more"),
        (["--num-tokens", "5", "--temperature", "-0.5"], "--temperature must be 0"),
        (["--num-tokens", "5", "--temperature", "nan"], "--temperature must be 0"),
        (["--num-tokens", "5", "--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--num-tokens", "5", "--seed", str(2**32)], "--seed must be in [0, 2**32)"),
        (["--num-tokens", str(2**31)], "--num-tokens must be below 2,147,483,647"),
    ],
)
def test_bad_arguments_are_rejected(byte_run, tmp_path, options, message):
    result = sample_command(byte_run, tmp_path / "s.txt", *options)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("tvq sample: error: ")
    assert message in lines[0]
    assert not (tmp_path / "s.txt").exists()


def test_missing_checkpoint_is_an_error(byte_run, tmp_path):
    data_dir, workdir = byte_run
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((workdir / "config.yaml").read_text())
    result = run_tvq("sample", "--workdir", empty, "--data-dir", data_dir, "--num-tokens", "5",
                     "--out", tmp_path / "s.txt")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("tvq sample: error: no checkpoint in ")
    assert "run `tvq train`" in lines[-1]
    assert not (tmp_path / "s.txt").exists()


def test_huge_top_k_keeps_every_token(byte_run, tmp_path):
    result = sample_command(byte_run, tmp_path / "s.txt", "--num-tokens", "5", "--top-k",
                            str(2**31))
    assert result.returncode == 0, result.stderr


def test_early_interrupt_stops_sampling(byte_run, tmp_path):
    """Ctrl-C before decoding starts still stops the run, with nothing written."""
    data_dir, workdir = byte_run
    command = tvq_command("sample", "--workdir", workdir, "--data-dir", data_dir,
                          "--num-tokens", "1000000", "--out", tmp_path / "s.txt", "--no-progress")
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert not (tmp_path / "s.txt").exists()


def test_prompt_folder_is_an_error(byte_run, tmp_path):
    result = sample_command(byte_run, tmp_path / "s.txt", "--num-tokens", "5",
                            "--prompt-file", tmp_path)
    assert result.returncode == 1
    assert f"prompt file {tmp_path} is a folder; pass a file" in result.stderr


def test_missing_prompt_file_is_an_error(byte_run, tmp_path):
    result = sample_command(byte_run, tmp_path / "s.txt", "--num-tokens", "5",
                            "--prompt-file", tmp_path / "absent.txt")
    assert result.returncode == 1
    assert "prompt file" in result.stderr
    assert "not found" in result.stderr
    assert not (tmp_path / "s.txt").exists()


def test_png_for_text_data_is_rejected(byte_run, tmp_path):
    result = sample_command(byte_run, tmp_path / "s.txt", "--num-tokens", "5",
                            "--png", tmp_path / "s.png")
    assert result.returncode == 1
    assert "--png draws ImageNet64 samples" in result.stderr
    assert not (tmp_path / "s.txt").exists()
    assert not (tmp_path / "s.png").exists()


def test_image_samples_form_a_png_grid(byte_run, tmp_path):
    """Byte data described as imagenet64 gives one 64x64 image per sample."""
    data_dir, workdir = byte_run
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    for path in data_dir.iterdir():
        (images_dir / path.name).symlink_to(path)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    (images_dir / "manifest.json").unlink()
    (images_dir / "manifest.json").write_text(json.dumps({**manifest, "dataset": "imagenet64"}))
    prompt = tmp_path / "prompt.bin"
    prompt.write_bytes(bytes(range(200)))

    result = run_tvq("sample", "--workdir", workdir, "--data-dir", images_dir, "--num-tokens",
                     "120", "--num-samples", "4", "--prompt-file", prompt, "--out",
                     tmp_path / "s.txt", "--png", tmp_path / "grid.png", "--no-progress")
    assert result.returncode == 0, result.stderr
    grid = mpimg.imread(tmp_path / "grid.png")
    side = 2 * 64 + 3 * GAP_PIXELS
    assert grid.shape[:2] == (side, side)
    # The first image's top-left pixels are the prompt's first subpixel values.
    top_left = np.round(grid[GAP_PIXELS, GAP_PIXELS : GAP_PIXELS + 2, :3] * 255)
    np.testing.assert_array_equal(top_left, [[0, 1, 2], [3, 4, 5]])

    # Each sample: a header, then 320 subpixels as one row of 192 and one of 128.
    lines = (tmp_path / "s.txt").read_text().splitlines()
    assert lines[0] == "=== sample 1 of 4 ==="
    assert lines[1].split()[:3] == ["0", "1", "2"]
    assert [len(lines[1].split()), len(lines[2].split())] == [192, 128]

    too_many = run_tvq("sample", "--workdir", workdir, "--data-dir", images_dir, "--num-tokens",
                       "20000", "--out", tmp_path / "big.txt")
    assert too_many.returncode == 1
    assert "an image has 12,288 subpixels" in too_many.stderr
    assert not (tmp_path / "big.txt").exists()

    whole_image = tmp_path / "whole.bin"
    whole_image.write_bytes(bytes(12_288))
    too_long = run_tvq("sample", "--workdir", workdir, "--data-dir", images_dir, "--num-tokens",
                       "1", "--prompt-file", whole_image, "--out", tmp_path / "long.txt")
    assert too_long.returncode == 1
    assert "has 12,288 subpixels, but one image has 12,288; shorten it to at most 12,287" \
        in too_long.stderr
