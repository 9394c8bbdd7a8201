"""Training-step throughput of whole models: VQ attention against dense attention.

For every head type, attention type and sequence length, one training step (forward,
backward, AdamW update and codebook update, the step `tvq train` runs) is compiled and
timed. Each configuration becomes one row, whatever happens to it. A configuration that
would not fit in memory is recorded as "out of memory". One whose first timed step
outruns the time budget is recorded as "over budget" with that step's time, and a
backend error as "failed: <message>". Model-FLOPs utilisation (MFU) divides the
analytic training FLOPs of `tvq.model.flops` by the accelerator's peak when one is
given, otherwise by the best square matmul of the same dtype timed in the same process.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import jax
import numpy as np

from tvq.bench.throughput_presets import PRESETS, ThroughputPreset
from tvq.bench.timing import failure_status, matmul_ceiling, record_step_times, time_steps
from tvq.files import write_text_atomic
from tvq.model.config import ATTN_TYPES, HEAD_TYPES, ConfigError, TransformerConfig
from tvq.model.flops import train_flops_per_token
from tvq.train.config import RunConfig, TrainConfig
from tvq.train.step import Trainer, make_mesh

GIB = 2**30


@dataclass
class Row:
    """One configuration's result, one line of throughput.csv."""

    preset: str
    backend: str
    device: str
    dtype: str
    n_layer: int
    d_model: int
    batch_size: int
    sequence_len: int
    head_type: str
    attn_type: str
    # "ok", "over budget", "out of memory" or "failed: <message>".
    status: str = "ok"
    compile_s: float = math.nan
    step_s_median: float = math.nan
    step_s_min: float = math.nan
    step_s_max: float = math.nan
    repeats: int = 0
    tokens_per_s: float = math.nan
    train_gflop_per_token: float = math.nan
    gflop_per_s: float = math.nan
    # The device's peak bytes in use where the backend reports it (GPU, TPU), otherwise
    # XLA's compile-time estimate of arguments, outputs and temporaries (CPU).
    peak_memory_gib: float = math.nan
    memory_source: str = ""
    matmul_gflop_per_s: float = math.nan
    peak_gflop_per_s: float = math.nan
    # gflop_per_s over peak_gflop_per_s when a peak was given, else over matmul_gflop_per_s.
    mfu: float = math.nan
    mfu_reference: str = ""


COLUMNS = [field.name for field in fields(Row)]
SPEEDUP_COLUMNS = [
    "preset", "dtype", "head_type", "sequence_len", "vq_tokens_per_s", "full_tokens_per_s",
    "full_status", "speedup", "flop_ratio", "speedup_of_flop_ratio", "vq_of_shortest",
]


def host_memory_bytes() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_config(preset: ThroughputPreset, T: int, head: str, attn: str) -> RunConfig:
    """Return the model and optimiser settings of one configuration."""
    model = TransformerConfig(
        d_model=preset.d_model, d_k=preset.d_k, n_code=preset.n_code,
        n_layer=preset.n_layer, block_len=preset.block_len, sequence_len=T,
        attn_type=attn, head_type=head, dtype=preset.dtype,
    )
    train = TrainConfig(
        preset="throughput", global_batch_size=batch_size(preset, T), optimizer="adamw",
        n_warmup_step=10, n_max_step=1000,
    )
    return RunConfig(model=model, train=train)


def batch_size(preset: ThroughputPreset, T: int) -> int:
    """Return tokens_per_step // T sequences, rounded up to a multiple of the device count."""
    n_device = jax.device_count()
    B = max(1, preset.tokens_per_step // T)
    return -(-B // n_device) * n_device


def _random_batch(trainer: Trainer, B: int, T: int) -> dict[str, jax.Array]:
    """Return a batch of uniformly random tokens, sharded like the training loop's."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, trainer.config.model.n_vocab, size=(B, T + 1), dtype=np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((B, T), bool),
    }
    return jax.device_put(batch, trainer.data_sharding)


def _batch_shapes(trainer: Trainer, B: int, T: int) -> dict[str, jax.ShapeDtypeStruct]:
    sharding = trainer.data_sharding
    return {
        "inputs": jax.ShapeDtypeStruct((B, T), np.int32, sharding=sharding),
        "targets": jax.ShapeDtypeStruct((B, T), np.int32, sharding=sharding),
        "loss_mask": jax.ShapeDtypeStruct((B, T), np.bool_, sharding=sharding),
    }


def _compiled_bytes(compiled) -> float:
    """Return XLA's estimate of the peak bytes a compiled program uses, or nan."""
    try:
        stats = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
        return math.nan
    if stats is None:
        return math.nan
    return float(
        stats.argument_size_in_bytes + stats.output_size_in_bytes
        + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    )


def _device_peak_bytes() -> float:
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return math.nan
    return float(stats["peak_bytes_in_use"])


def bench_one(
    row: Row,
    config: RunConfig,
    *,
    repeats: int,
    budget_s: float,
    max_memory_bytes: float,
) -> Row:
    """Compile and time one configuration, filling row; failures become its status."""
    B, T = config.train.global_batch_size, config.model.sequence_len
    row.train_gflop_per_token = train_flops_per_token(config.model) / 1e9
    try:
        trainer = Trainer(config, make_mesh(config.train.mesh_data, config.train.mesh_model))
        state = trainer.init_state()

        # Compiled for the batch's shapes only, so that a batch too large to fit is
        # never allocated.
        # Under the mesh, as Trainer.train_step runs it, so activations are pinned alike.
        start = time.perf_counter()
        with jax.set_mesh(trainer.mesh):
            lowered = trainer._train_step.lower(state, _batch_shapes(trainer, B, T))
        compiled = lowered.compile()
        row.compile_s = time.perf_counter() - start

        # The CPU backend has no allocator limit of its own: past the host's memory the
        # kernel kills the process, so a program that cannot fit is not run at all.
        estimate = _compiled_bytes(compiled)
        row.peak_memory_gib, row.memory_source = estimate / GIB, "compiled"
        if estimate > max_memory_bytes:
            row.status = "out of memory"
            return row

        batch = _random_batch(trainer, B, T)

        def run_step() -> None:
            nonlocal state
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])

        seconds = time_steps(run_step, repeats, budget_s)
        peak = _device_peak_bytes()
        if not math.isnan(peak):
            row.peak_memory_gib, row.memory_source = peak / GIB, "device"
    except Exception as error:  # noqa: BLE001 - any backend failure becomes a row
        row.status = failure_status(error)
        return row
    finally:
        jax.clear_caches()

    record_step_times(row, seconds)
    row.tokens_per_s = B * T / row.step_s_median
    row.gflop_per_s = row.train_gflop_per_token * row.tokens_per_s
    return row


def check_lengths(preset: ThroughputPreset, sequence_lens: list[int]) -> None:
    """Raise ConfigError naming every length that is not a whole number of >= 3 blocks."""
    L = preset.block_len
    bad = [T for T in sequence_lens if T % L or T // L < 3]
    if bad:
        raise ConfigError(
            f"sequence lengths {bad} are not multiples of the block length {L} with at "
            f"least 3 blocks; use multiples of {L} from {3 * L}"
        )


def speedup_rows(rows: list[Row]) -> list[dict]:
    """Return vq's speed-up over full per dtype, head type and length, for speedup.csv.

    A full row that ran past the budget still carries one timed step, a fair sample of
    the compiled program, so its speed-up is given. Rows with no timing give nan.
    """
    by_key = {(r.dtype, r.sequence_len, r.head_type, r.attn_type): r for r in rows}
    shortest: dict[tuple[str, str], Row] = {}
    out = []
    for r in sorted(rows, key=lambda r: (r.dtype, r.head_type, r.sequence_len)):
        if r.attn_type != "vq":
            continue
        if not math.isnan(r.tokens_per_s):
            shortest.setdefault((r.dtype, r.head_type), r)
        base = shortest.get((r.dtype, r.head_type))
        full = by_key.get((r.dtype, r.sequence_len, r.head_type, "full"))
        full_tokens = full.tokens_per_s if full is not None else math.nan
        speedup = r.tokens_per_s / full_tokens
        flop_ratio = (
            full.train_gflop_per_token / r.train_gflop_per_token if full is not None else math.nan
        )
        out.append({
            "preset": r.preset,
            "dtype": r.dtype,
            "head_type": r.head_type,
            "sequence_len": r.sequence_len,
            "vq_tokens_per_s": r.tokens_per_s,
            "full_tokens_per_s": full_tokens,
            "full_status": full.status if full is not None else "not run",
            "speedup": speedup,
            "flop_ratio": flop_ratio,
            "speedup_of_flop_ratio": speedup / flop_ratio,
            "vq_of_shortest": r.tokens_per_s / base.tokens_per_s if base else math.nan,
        })
    return out


def _csv_text(records: list[dict], columns: list[str]) -> str:
    lines = [",".join(columns)]
    for record in records:
        cells = []
        for column in columns:
            value = record[column]
            if isinstance(value, float) and not math.isnan(value):
                value = f"{value:.6g}"
            cells.append(str(value))
        lines.append(",".join(_quote(cell) for cell in cells))
    return "\n".join(lines) + "\n"


def _quote(cell: str) -> str:
    if any(char in cell for char in ',"\n'):
        return '"' + cell.replace('"', '""') + '"'
    return cell


def write_csv(path: Path, records: list[dict], columns: list[str]) -> None:
    """Write records as CSV atomically ("nan" marks a missing number)."""
    write_text_atomic(Path(path), _csv_text(records, columns))


def read_rows(path: Path) -> list[Row]:
    """Read throughput.csv back into rows."""
    types = {field.name: field.type for field in fields(Row)}
    rows = []
    with Path(path).open(newline="") as handle:
        for record in csv.DictReader(handle):
            values = {}
            for name, text in record.items():
                kind = types[name]
                if kind == "float":
                    values[name] = float(text)
                elif kind == "int":
                    values[name] = int(text)
                else:
                    values[name] = text
            rows.append(Row(**values))
    return rows


def format_row(r: Row) -> str:
    spread = f"{r.step_s_median:.3f} ({r.step_s_min:.3f}-{r.step_s_max:.3f})"
    return (
        f"{r.dtype:<9} {r.sequence_len:>6} {r.batch_size:>3} {r.head_type:<5} {r.attn_type:<5} "
        f"{spread:>24} {r.tokens_per_s:>9.0f} {r.train_gflop_per_token:>9.3f} "
        f"{r.gflop_per_s:>9.1f} {r.mfu:>6.1%} {r.peak_memory_gib:>7.2f}  {r.status}"
    )


HEADER = (
    f"{'dtype':<9} {'T':>6} {'B':>3} {'head':<5} {'attn':<5} {'step s (min-max)':>24} "
    f"{'tokens/s':>9} {'GFLOP/tok':>9} {'GFLOP/s':>9} {'MFU':>6} {'mem GiB':>7}  status"
)


def format_speedups(records: list[dict]) -> str:
    lines = [
        f"{'dtype':<9} {'T':>6} {'head':<5} {'vq/full':>8} {'FLOP ratio':>10} "
        f"{'of FLOP ratio':>13} {'vq vs shortest T':>16}  full status"
    ]
    for s in records:
        lines.append(
            f"{s['dtype']:<9} {s['sequence_len']:>6} {s['head_type']:<5} {s['speedup']:>8.2f} "
            f"{s['flop_ratio']:>10.2f} {s['speedup_of_flop_ratio']:>13.1%} "
            f"{s['vq_of_shortest']:>16.1%}  {s['full_status']}"
        )
    return "\n".join(lines)


def run(
    preset_name: str,
    *,
    sequence_lens: list[int] | None = None,
    head_types: list[str] | None = None,
    attn_types: list[str] | None = None,
    dtype: str | None = None,
    n_layer: int | None = None,
    repeats: int = 3,
    budget_s: float = 300.0,
    max_memory_gib: float | None = None,
    peak_tflops: float | None = None,
    matmul_size: int = 4096,
    out: Path | None = None,
    speedup_out: Path | None = None,
    log=print,
) -> list[Row]:
    """Time every configuration, logging each row as it finishes; write the CSV files."""
    preset = PRESETS[preset_name]
    overrides = {}
    if dtype is not None:
        overrides["dtype"] = dtype
    if n_layer is not None:
        overrides["n_layer"] = n_layer
    if overrides:
        preset = ThroughputPreset(**{**asdict(preset), **overrides})
    sequence_lens = list(sequence_lens or preset.sequence_lens)
    check_lengths(preset, sequence_lens)
    head_types = list(head_types or HEAD_TYPES)
    attn_types = list(attn_types or ["vq", "full"])
    for attn in attn_types:
        if attn not in ATTN_TYPES:
            raise ConfigError(f"unknown attention type {attn!r}; use one of {ATTN_TYPES}")

    if max_memory_gib is None:
        max_memory_bytes = 0.8 * host_memory_bytes()
    else:
        max_memory_bytes = max_memory_gib * GIB
    device = jax.local_devices()[0]
    backend = jax.default_backend()
    device_name = getattr(device, "device_kind", str(device))
    log(f"devices: {jax.device_count()} x {device_name} ({backend})")

    matmul_gflops = matmul_ceiling(preset.dtype, matmul_size)
    peak_gflops = peak_tflops * 1e3 if peak_tflops else math.nan
    log(f"{preset.dtype} matmul ceiling: {matmul_gflops:.1f} GFLOP/s")
    log(HEADER)

    rows = []
    for T in sequence_lens:
        for head in head_types:
            for attn in attn_types:
                config = run_config(preset, T, head, attn)
                row = Row(
                    preset=preset_name, backend=backend, device=device_name,
                    dtype=preset.dtype, n_layer=preset.n_layer, d_model=preset.d_model,
                    batch_size=config.train.global_batch_size, sequence_len=T,
                    head_type=head, attn_type=attn, matmul_gflop_per_s=matmul_gflops,
                    peak_gflop_per_s=peak_gflops,
                )
                bench_one(
                    row, config, repeats=repeats, budget_s=budget_s,
                    max_memory_bytes=max_memory_bytes,
                )
                reference = peak_gflops if peak_tflops else matmul_gflops
                row.mfu = row.gflop_per_s / reference
                row.mfu_reference = "peak" if peak_tflops else "matmul"
                rows.append(row)
                log(format_row(row))

    speedups = speedup_rows(rows)
    log("")
    log(format_speedups(speedups))
    if out is not None:
        write_csv(out, [asdict(r) for r in rows], COLUMNS)
        log(f"wrote {len(rows)} rows to {out}")
    if speedup_out is not None:
        write_csv(speedup_out, speedups, SPEEDUP_COLUMNS)
        log(f"wrote {len(speedups)} rows to {speedup_out}")
    sys.stdout.flush()
    return rows
