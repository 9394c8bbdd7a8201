"""Helpers for tests that train: a small generated corpus, a tiny config, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from tvq.data.enwik8 import prepare_text

# A model small enough to train for dozens of steps in seconds on one CPU core.
TINY_CONFIG = {
    "preset": "test",
    "n_vocab": 259,
    "d_model": 32,
    "d_k": 16,
    "n_code": 16,
    "n_layer": 1,
    "block_len": 16,
    "sequence_len": 64,
    "head_type": "shga",
    "dtype": "float32",
    "remat": "none",
    "p_dropres": 0.1,
    "global_batch_size": 4,
    "lr_max": 0.003,
    "n_warmup_step": 5,
    "n_max_step": 20,
    "n_print_step": 1,
    "n_save_step": 5,
    "n_save_keep": 2,
    "n_eval_step": 2,
    "eval_batch_size": 4,
}


def write_corpus(path: Path, n_words: int = 30_000, seed: int = 0) -> Path:
    """Write text of random words from a small lexicon, one short line per sentence."""
    rng = np.random.default_rng(seed)
    lexicon = (
        "the of and to in is was for on as with by that it from at his an were are "
        "which this be or has had first one their its new after who they two her she "
        "been other when there all during into school time may years more most only "
        "over city some world would where later up such used many can state about "
        "national out known university united then made"
    ).split()
    words = rng.choice(lexicon, size=n_words)
    lines = [" ".join(words[i : i + 12]) + ".\n" for i in range(0, n_words, 12)]
    path.write_text("".join(lines))
    return path


def prepare_corpus(folder: Path) -> Path:
    """Prepare byte-level splits of a generated corpus into folder/data."""
    return prepare_corpus_from(folder, seed=0)


def prepare_corpus_from(folder: Path, seed: int) -> Path:
    """Prepare byte-level splits of the corpus generated from `seed` into folder/data."""
    folder.mkdir(parents=True, exist_ok=True)
    source = write_corpus(folder / "corpus.txt", seed=seed)
    prepare_text([str(source)], folder / "data")
    return folder / "data"


def write_config(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**TINY_CONFIG, **changes}))
    return path


def tvq_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tvq.cli", *map(str, args)]


def run_tvq(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the tvq command line in a child process and capture its output."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        tvq_command(*args), capture_output=True, text=True, timeout=timeout, env=env
    )
