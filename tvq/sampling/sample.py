"""`tvq sample`: generate text or images from a run's best checkpoint.

Every sample starts from the end-of-sequence id, as training and evaluation sequences
do, followed by the prompt. The prompt and the generated tokens go through the model
one token at a time with incremental decoding, so a prompt may be longer than the
model's sequence length. Byte and SentencePiece datasets give the generated text.
ImageNet64 gives the subpixel values as text, one image row per line, and optionally a
PNG grid with one image per sample.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from tvq.data.errors import DataError
from tvq.data.vocab import BYTE_OFFSET, EOS_ID, decode_bytes, encode_bytes
from tvq.distributed import any_process, is_primary
from tvq.evaluation.evaluate import load_workdir_config, restore_best_checkpoint
from tvq.files import check_writable, write_bytes_atomic, write_text_atomic
from tvq.model.config import ConfigError
from tvq.model.decode_attention import MAX_POSITIONS
from tvq.sampling.decoder import Decoder
from tvq.sampling.images import (
    IMAGE_SHAPE,
    SUBPIXELS_PER_IMAGE,
    image_grid,
    png_bytes,
    subpixel_images,
)
from tvq.train.config import RunConfig
from tvq.train.loop import check_data, stop_reason, stop_requests, stop_status

log = logging.getLogger(__name__)

# Tokens per compiled decoding call: progress is reported and signals are checked
# between calls, and each call is one scan of this many steps.
CHUNK_LEN = 256


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Sampling settings: token counts, the filters of tvq.sampling.filters and the seed."""

    num_tokens: int
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def errors(self) -> list[str]:
        problems = []
        if self.num_tokens < 1:
            problems.append(f"--num-tokens must be at least 1, got {self.num_tokens}")
        if self.num_samples < 1:
            problems.append(f"--num-samples must be at least 1, got {self.num_samples}")
        if not self.temperature >= 0.0:
            problems.append(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"--top-k must be 0 (off) or more, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**32:
            problems.append(f"--seed must be in [0, 2**32), got {self.seed}")
        # Positions are int32 on the device.
        if self.num_tokens >= MAX_POSITIONS:
            problems.append(
                f"--num-tokens must be below {MAX_POSITIONS:,}, got {self.num_tokens:,}"
            )
        return problems


def is_image_data(manifest: dict[str, Any]) -> bool:
    return manifest.get("dataset") == "imagenet64"


def encode_prompt(path: Path, manifest: dict[str, Any]) -> np.ndarray:
    """Read a prompt file and return its token ids: raw bytes for byte vocabularies
    (subpixel values for ImageNet64), UTF-8 text for SentencePiece ones."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"prompt file {path} not found; pass an existing --prompt-file") from None
    except IsADirectoryError:
        raise DataError(f"prompt file {path} is a folder; pass a file") from None
    if manifest["vocab"]["type"] == "bytes":
        return encode_bytes(data).astype(np.int32)

    from tvq.data.sentencepiece_vocab import SentencePieceVocab

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"prompt file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from None
    return SentencePieceVocab(Path(manifest["vocab"]["model"])).encode(text).astype(np.int32)


def text_decoder(manifest: dict[str, Any]):
    """Return a function from token ids to text for the manifest's vocabulary.

    Byte sequences that are not UTF-8 become U+FFFD replacement characters.
    """
    if manifest["vocab"]["type"] == "bytes":
        return lambda tokens: decode_bytes(tokens).decode("utf-8", errors="replace")

    from tvq.data.sentencepiece_vocab import SentencePieceVocab

    vocab = SentencePieceVocab(Path(manifest["vocab"]["model"]))
    return lambda tokens: vocab.decode(tokens)


def _chunks(total: int) -> list[int]:
    """Split `total` steps into CHUNK_LEN-step runs and one shorter remainder."""
    return [CHUNK_LEN] * (total // CHUNK_LEN) + ([total % CHUNK_LEN] if total % CHUNK_LEN else [])


def _check_outputs(out: Path, png: Path | None, image: bool) -> None:
    if out.suffix == ".png":
        raise ConfigError(f"--out {out} is the text output; give the PNG path with --png")
    if png is not None and not image:
        raise ConfigError("--png draws ImageNet64 samples; this dataset's samples are text")
    if png is not None and Path(os.path.realpath(png)) == Path(os.path.realpath(out)):
        raise ConfigError(f"--out and --png name the same file {out}; give two paths")
    check_writable(out)
    if png is not None:
        check_writable(png)


def sample(
    workdir: Path,
    data_dir: Path,
    out: Path,
    settings: SamplingSettings,
    *,
    config: RunConfig | None = None,
    prompt_file: Path | None = None,
    png: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate settings.num_samples continuations of the prompt and write them to `out`
    (and, for ImageNet64, the images to `png`).

    Returns a summary: the checkpoint step, token counts and the decoding speed.
    """
    problems = settings.errors()
    if problems:
        raise ConfigError("; ".join(problems))
    # Signals only set a flag, checked between decoding calls (see tvq.train.loop).
    with stop_requests() as stop:
        png = None if png is None else Path(png)
        return _sample(
            Path(workdir), Path(data_dir), Path(out), png, settings, config, prompt_file,
            progress, stop,
        )


def _sample(workdir, data_dir, out, png, settings, config, prompt_file, progress, stop):
    started = time.perf_counter()
    config = config or load_workdir_config(workdir)
    manifest = check_data(config, data_dir)
    image = is_image_data(manifest)
    _check_outputs(out, png, image)

    prompt = np.zeros(0, np.int32)
    if prompt_file is not None:
        prompt = encode_prompt(prompt_file, manifest)
    if prompt.size and int(prompt.max()) >= config.model.n_vocab:
        raise DataError(
            f"prompt file {prompt_file} encodes to token id {int(prompt.max())}, outside the "
            f"model's n_vocab {config.model.n_vocab}"
        )
    if image and len(prompt) >= SUBPIXELS_PER_IMAGE:
        raise ConfigError(
            f"prompt file {prompt_file} has {len(prompt):,} subpixels, but one image has "
            f"{SUBPIXELS_PER_IMAGE:,}; shorten it to at most {SUBPIXELS_PER_IMAGE - 1:,}"
        )
    if image and len(prompt) + settings.num_tokens > SUBPIXELS_PER_IMAGE:
        raise ConfigError(
            f"an image has {SUBPIXELS_PER_IMAGE:,} subpixels, but the prompt has "
            f"{len(prompt):,} and --num-tokens asks for {settings.num_tokens:,}; lower "
            f"--num-tokens to {SUBPIXELS_PER_IMAGE - len(prompt):,} or less"
        )
    if 1 + len(prompt) + settings.num_tokens >= MAX_POSITIONS:
        raise ConfigError(
            f"the prompt's {len(prompt):,} tokens and --num-tokens {settings.num_tokens:,} "
            f"exceed the {MAX_POSITIONS:,} positions a sequence can have; lower --num-tokens"
        )
    # Loaded before the checkpoint, so that a vocabulary that cannot be read stops the
    # run before any token is generated.
    to_text = text_decoder(manifest)

    restored = restore_best_checkpoint(workdir, config)
    B = settings.num_samples
    inputs = np.tile(np.concatenate([[EOS_ID], prompt]).astype(np.int32), (B, 1))
    # Every consumed token needs a slot: the inputs and each generated token. The draw
    # is limited to the data's ids, which n_vocab may exceed.
    decoder = Decoder(
        config.model, restored.state, B, inputs.shape[1] + settings.num_tokens,
        vocab_size=manifest["vocab"]["size"],
    )
    log.info(
        "sampling %d x %s tokens after a %s-token prompt with the checkpoint of step %d "
        "(temperature %g, top-k %d, top-p %g, seed %d)",
        B, f"{settings.num_tokens:,}", f"{len(prompt):,}", restored.step,
        settings.temperature, settings.top_k, settings.top_p, settings.seed,
    )

    total = inputs.shape[1] + settings.num_tokens
    bar = tqdm(total=total, unit="token", disable=not progress, desc="prompt")
    cache = decoder.start()
    logits = None
    consumed = 0
    for length in _chunks(inputs.shape[1]):
        cache, logits = decoder.consume(cache, inputs[:, consumed : consumed + length])
        jax.block_until_ready(logits)
        consumed += length
        bar.update(length)
        if any_process(bool(stop)):
            break
    prompt_s = time.perf_counter() - started

    bar.set_description("sample")
    key = jax.random.PRNGKey(settings.seed)
    generated = []
    generation_started = time.perf_counter()
    for length in _chunks(settings.num_tokens):
        if any_process(bool(stop)):
            break
        cache, logits, tokens = decoder.generate(
            cache, logits, key, sum(t.shape[1] for t in generated), length,
            temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
        )
        generated.append(np.asarray(tokens))
        bar.update(length)
    bar.close()
    if any_process(bool(stop)):
        log.info("%s; no samples written", stop_reason(stop))
        raise SystemExit(stop_status(stop))
    generation_s = time.perf_counter() - generation_started
    tokens = np.concatenate(generated, axis=1)

    if image:
        subpixels = np.concatenate([inputs[:, 1:], tokens], axis=1)
        texts = [subpixel_rows(row) for row in subpixels]
    else:
        texts = [to_text(row) for row in tokens]
    # Every process of a multi-process job decodes the same samples; process 0 writes.
    # The image goes first: if it fails, neither output is replaced.
    if png is not None and is_primary():
        write_bytes_atomic(png, png_bytes(image_grid(subpixel_images(subpixels))))
    if is_primary():
        write_text_atomic(out, format_text_samples(texts))

    summary = {
        "checkpoint_step": restored.step,
        "num_samples": B,
        "prompt_tokens": int(len(prompt)),
        "generated_tokens": settings.num_tokens,
        # Includes compiling the decoding loop once.
        "seconds_per_token": generation_s / settings.num_tokens,
        "prompt_seconds": prompt_s,
        "wall_time_s": time.perf_counter() - started,
    }
    log.info(
        "generated %d x %s tokens in %.1f s (%.2f ms per step, compilation included); wrote %s",
        B, f"{settings.num_tokens:,}", generation_s, 1e3 * summary["seconds_per_token"],
        out if png is None else f"{out} and {png}",
    )
    return summary


def subpixel_rows(tokens: np.ndarray) -> str:
    """Write one image's prompt and generated subpixels as text: the values 0 .. 255
    (-1 for a special id), one image row of 64 x 3 per line."""
    values = np.where(tokens >= BYTE_OFFSET, tokens - BYTE_OFFSET, -1)
    row_len = IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    lines = [
        " ".join(map(str, values[start : start + row_len]))
        for start in range(0, len(values), row_len)
    ]
    return "\n".join(lines)


def format_text_samples(texts: list[str]) -> str:
    """Join samples, each under a header line when there are several."""
    if len(texts) == 1:
        return texts[0] + "\n"
    parts = [f"=== sample {i + 1} of {len(texts)} ===\n{text}\n" for i, text in enumerate(texts)]
    return "\n".join(parts)
