"""Training-step throughput of one-layer models: VQ attention against dense attention.

Times loss, gradients and the codebook update of a one-layer model for each dtype,
sequence length, head type and attention type. The default widths (d_model 768, d_k
128, n_code 512, block_len 512) are those of the throughput comparison in the
Transformer-VQ paper. The achieved FLOP rate is set against the best of several square
float32 matmuls timed in the same process.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax

from tvq.bench.timing import failure_status, matmul_ceiling, record_step_times, time_steps
from tvq.model.config import TransformerConfig
from tvq.model.flops import train_flops_per_token
from tvq.model.losses import cross_entropy
from tvq.model.transformer import Transformer


@dataclass
class Row:
    dtype: str
    sequence_len: int
    head_type: str
    attn_type: str
    status: str  # "ok", "out of memory", "over budget" or "failed: <error>"
    compile_s: float = float("nan")
    step_s_median: float = float("nan")
    step_s_min: float = float("nan")
    step_s_max: float = float("nan")
    repeats: int = 0
    tokens_per_s: float = float("nan")
    train_gflop_per_token: float = float("nan")
    gflop_per_s: float = float("nan")
    fraction_of_matmul: float = float("nan")


def make_train_step(model: Transformer):
    """Return a jitted (params, codebook, tokens) -> ((loss, new codebook), grads)."""

    def loss_fn(params, codebook, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        (logits, aux), updates = model.apply(
            {"params": params, "codebook": codebook},
            inputs,
            train=True,
            mutable=["codebook"],
            rngs={"dropout": jax.random.PRNGKey(0)},
        )
        loss = cross_entropy(logits, targets) + aux["commit_loss"]
        return loss, updates.get("codebook", {})

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def bench_config(config: TransformerConfig, repeats: int, budget_s: float) -> Row:
    """Compile and time one configuration; failures become the row's status."""
    row = Row(config.dtype, config.sequence_len, config.head_type, config.attn_type, "ok")
    row.train_gflop_per_token = train_flops_per_token(config) / 1e9
    model = Transformer(config)
    tokens = jax.random.randint(
        jax.random.PRNGKey(0), (1, config.sequence_len + 1), 0, config.n_vocab
    )
    try:
        variables = jax.jit(model.init)(jax.random.PRNGKey(1), tokens[:, :-1])
        params, codebook = variables["params"], variables.get("codebook", {})
        step = make_train_step(model)

        start = time.perf_counter()
        compiled = step.lower(params, codebook, tokens).compile()
        row.compile_s = time.perf_counter() - start

        seconds = time_steps(
            lambda: jax.block_until_ready(compiled(params, codebook, tokens)), repeats, budget_s
        )
    except Exception as error:  # noqa: BLE001 - any backend failure becomes a row
        row.status = failure_status(error)
        return row

    record_step_times(row, seconds)
    row.tokens_per_s = config.sequence_len / row.step_s_median
    row.gflop_per_s = row.train_gflop_per_token * row.tokens_per_s
    return row


def format_rows(rows: list[Row], matmul_gflops: float) -> str:
    lines = [
        f"float32 matmul ceiling: {matmul_gflops:.1f} GFLOP/s",
        "",
        f"{'dtype':<9} {'T':>6} {'head':<5} {'attn':<5} {'step s (min-max)':>22} "
        f"{'tokens/s':>9} {'GFLOP/tok':>9} {'GFLOP/s':>8} {'of matmul':>9}  status",
    ]
    for r in rows:
        spread = f"{r.step_s_median:.3f} ({r.step_s_min:.3f}-{r.step_s_max:.3f})"
        lines.append(
            f"{r.dtype:<9} {r.sequence_len:>6} {r.head_type:<5} {r.attn_type:<5} {spread:>22} "
            f"{r.tokens_per_s:>9.0f} {r.train_gflop_per_token:>9.3f} {r.gflop_per_s:>8.1f} "
            f"{r.fraction_of_matmul:>9.1%}  {r.status}"
        )
    return "\n".join(lines)


def format_ratios(rows: list[Row]) -> str:
    """vq/full speed-up against the FLOP ratio, and vq's throughput against its shortest T."""
    by_key = {(r.dtype, r.sequence_len, r.head_type, r.attn_type): r for r in rows}
    lines = [
        "",
        f"{'dtype':<9} {'T':>6} {'head':<5} {'vq/full speed-up':>16} {'FLOP ratio':>10} "
        f"{'speed-up/FLOP ratio':>19} {'vq tokens/s vs shortest T':>25}",
    ]
    shortest = {}
    for (dtype, T, head, attn), vq in sorted(by_key.items(), key=lambda item: item[0][1]):
        if attn != "vq":
            continue
        shortest.setdefault((dtype, head), vq)
        full = by_key.get((dtype, T, head, "full"))
        speedup = flop_ratio = float("nan")
        if full is not None:
            speedup = vq.tokens_per_s / full.tokens_per_s
            flop_ratio = full.train_gflop_per_token / vq.train_gflop_per_token
        base = shortest[(dtype, head)]
        lines.append(
            f"{dtype:<9} {T:>6} {head:<5} {speedup:>16.2f} {flop_ratio:>10.2f} "
            f"{speedup / flop_ratio:>19.1%} {vq.tokens_per_s / base.tokens_per_s:>25.1%}"
        )
    return "\n".join(lines)


def run(
    sequence_lens: list[int],
    head_types: list[str],
    attn_types: list[str],
    dtypes: list[str],
    d_model: int,
    d_k: int,
    n_code: int,
    block_len: int,
    repeats: int,
    budget_s: float,
    matmul_size: int,
    out: Path | None,
) -> list[Row]:
    """Run every combination, printing each row as it finishes; write CSV or JSON to out."""
    print(f"devices: {jax.devices()}", flush=True)
    matmul_gflops = matmul_ceiling("float32", matmul_size)
    print(f"float32 matmul ceiling: {matmul_gflops:.1f} GFLOP/s", flush=True)

    rows = []
    for dtype in dtypes:
        for T in sequence_lens:
            for head in head_types:
                for attn in attn_types:
                    config = TransformerConfig(
                        d_model=d_model, d_k=d_k, n_code=n_code, n_layer=1,
                        block_len=block_len, sequence_len=T, attn_type=attn,
                        head_type=head, dtype=dtype,
                    )
                    row = bench_config(config, repeats, budget_s)
                    row.fraction_of_matmul = row.gflop_per_s / matmul_gflops
                    rows.append(row)
                    print(format_rows([row], matmul_gflops).splitlines()[-1], flush=True)

    print()
    print(format_rows(rows, matmul_gflops))
    print(format_ratios(rows))
    if out is not None:
        write_rows(rows, matmul_gflops, out)
        print(f"\nwrote {len(rows)} rows to {out}")
    return rows


def write_rows(rows: list[Row], matmul_gflops: float, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [{**asdict(r), "matmul_gflop_per_s": matmul_gflops} for r in rows]
    if out.suffix == ".json":
        out.write_text(json.dumps(records, indent=2) + "\n")
        return
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
