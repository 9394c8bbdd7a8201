"""Model sizes of `tvq bench throughput`, importable without JAX for the command line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ThroughputPreset:
    """Model widths and sequence lengths of one throughput comparison."""

    d_model: int
    d_k: int
    n_code: int
    n_layer: int
    block_len: int
    sequence_lens: tuple[int, ...]
    dtype: str
    # Tokens per training step: the batch is tokens_per_step // T sequences (at least one).
    tokens_per_step: int


PRESETS = {
    # A check of the benchmark itself; its figures mean nothing.
    "tiny": ThroughputPreset(
        d_model=64, d_k=16, n_code=16, n_layer=1, block_len=32,
        sequence_lens=(128, 256), dtype="float32", tokens_per_step=256,
    ),
    # The paper's throughput widths with one layer, for a CPU. T = 1024 holds only two
    # blocks of 512, fewer than VQ attention needs, so the lengths start at 2048.
    "cpu": ThroughputPreset(
        d_model=768, d_k=128, n_code=512, n_layer=1, block_len=512,
        sequence_lens=(2048, 4096, 8192, 16384, 32768), dtype="float32",
        # One sequence per step, so that a step at T = 32768 stays under a minute.
        tokens_per_step=1,
    ),
    # The paper's enwik8 model (768 wide, 24 layers) at a constant 131,072 tokens per step.
    "paper": ThroughputPreset(
        d_model=768, d_k=128, n_code=512, n_layer=24, block_len=512,
        sequence_lens=(2048, 8192, 32768, 131072), dtype="bfloat16", tokens_per_step=131072,
    ),
}
