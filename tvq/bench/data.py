"""Data-preparation time and batch-iterator throughput."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tvq.data.batches import train_batches
from tvq.data.enwik8 import prepare_enwik8
from tvq.data.splits import load_split


def run(source: Path, batch_size: int, sequence_len: int, n_batches: int) -> dict[str, float]:
    """Prepare source as enwik8-style bytes in a temporary folder, then time the iterator."""
    with tempfile.TemporaryDirectory(prefix="tvq-bench-data-") as scratch:
        out_dir = Path(scratch) / "prepared"
        start = time.perf_counter()
        manifest = prepare_enwik8(str(source), out_dir, Path(scratch) / "downloads", progress=False)
        prepare_s = time.perf_counter() - start
        n_bytes = manifest["content_bytes"]
        print(f"prepared {source}: {n_bytes:,} bytes in {prepare_s:.2f} s "
              f"({n_bytes / prepare_s / 1e6:.1f} MB/s)")

        tokens = load_split(out_dir, "train")
        batches = train_batches(
            tokens, seed=0, batch_size=batch_size, sequence_len=sequence_len, num_steps=n_batches
        )
        next(batches)  # the first batch includes starting grain's threads
        start = time.perf_counter()
        count = sum(1 for _ in batches)
        iterate_s = time.perf_counter() - start
        rate = count / iterate_s
        million_tokens = rate * batch_size * sequence_len / 1e6
        print(f"train iterator, batch {batch_size} x {sequence_len}: {count} batches in "
              f"{iterate_s:.2f} s = {rate:.1f} batches/s ({million_tokens:.1f} M tokens/s)")
    return {"prepare_s": prepare_s, "bytes": n_bytes, "batches_per_s": rate}
