"""Per-token decoding latency and memory against context length: VQ against full attention.

For every head type, attention type and context length T, the benchmark builds a
decoding state that has consumed T tokens. From that state, `Decoder.generate` draws
`steps` more tokens in one compiled call: first a warm-up call, then up to `repeats`
timed calls. The latency of a token is a call's wall time over `steps`, and compilation
is timed separately. Each configuration becomes one row, whatever happens to it, with
the statuses of `tvq.bench.throughput`.

Decoding T tokens one by one to reach a context would cost time quadratic in T with full
attention, so the state is built directly: every `position` is set to T, and the
windows, key/value caches, code counts and value sums contain random values laid out as
after T tokens. The cost of a step depends on the state's shapes and on its position
(which steps roll the VQ window into the cache), not on the values in it, so the timing
is that of a real state at that context.

A VQ state has the same size at every context. A full-attention state is allocated for
T + steps + 1 positions and each step attends over all of them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from tvq.bench.throughput import (
    _compiled_bytes,
    _device_peak_bytes,
    host_memory_bytes,
    write_csv,
)
from tvq.bench.timing import failure_status, record_step_times, time_steps
from tvq.model.config import ConfigError, TransformerConfig
from tvq.model.decode_attention import MAX_POSITIONS
from tvq.model.transformer import Transformer
from tvq.sampling.decoder import Cache, Decoder

# The widths of the `cpu` training preset (config/presets/cpu.yaml).
CPU_PRESET_WIDTHS = {
    "d_model": 128,
    "d_k": 32,
    "n_code": 64,
    "n_layer": 4,
    "block_len": 64,
    "dtype": "float32",
}
DEFAULT_CONTEXTS = (1024, 8192, 65536)
MIB = 2**20


@dataclass
class Row:
    """One configuration's result, one line of the CSV file."""

    attn_type: str
    head_type: str
    dtype: str
    context: int
    batch_size: int
    steps: int
    # "ok", "over budget", "out of memory" or "failed: <message>".
    status: str = "ok"
    compile_s: float = math.nan
    # Milliseconds per decoding step, which adds one token to each of the batch_size
    # sequences; tokens_per_s counts all of them.
    ms_per_token_median: float = math.nan
    ms_per_token_min: float = math.nan
    ms_per_token_max: float = math.nan
    repeats: int = 0
    # Tokens decoded per second over the whole batch: batch_size / median latency.
    tokens_per_s: float = math.nan
    # Bytes of the decoding state (the "cache" collection) of the whole batch.
    state_bytes: int = 0
    # The device's peak bytes in use where the backend reports it (GPU, TPU), otherwise
    # XLA's compile-time estimate of the generate call's arguments, outputs and
    # temporaries (CPU).
    peak_memory_bytes: float = math.nan
    memory_source: str = ""
    # Median latency over that of the shortest timed context of the same head and
    # attention type.
    latency_vs_first: float = math.nan


COLUMNS = [field.name for field in fields(Row)]


def model_config(head_type: str = "shga", attn_type: str = "vq", **widths) -> TransformerConfig:
    """Return the benchmarked model: the cpu preset's widths, updated with `widths`.

    Decoding does not depend on sequence_len, but the config requires at least three
    blocks, so it is set to 3 * block_len.
    """
    values = {**CPU_PRESET_WIDTHS, **widths}
    return TransformerConfig(
        **values, sequence_len=3 * values["block_len"], head_type=head_type,
        attn_type=attn_type, remat="none",
    )




def check_contexts(contexts: list[int], steps: int = 0) -> None:
    """Raise ConfigError naming every context length that is not a positive integer, or
    that leaves no room for `steps` more tokens in int32 positions."""
    bad = [T for T in contexts if isinstance(T, bool) or not isinstance(T, int) or T <= 0]
    if bad:
        raise ConfigError(f"context lengths {bad} are invalid; use positive numbers of tokens")
    too_long = [T for T in contexts if T + steps + 1 >= MAX_POSITIONS]
    if too_long:
        raise ConfigError(
            f"context lengths {too_long} plus {steps} steps exceed the {MAX_POSITIONS:,} "
            "positions a decoding state can have; use shorter contexts"
        )


def tree_bytes(tree) -> int:
    """Return the total bytes of a pytree of arrays or shape-dtype structs."""
    return sum(
        math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree_util.tree_leaves(tree)
    )


def vq_window_layout(context: int, block_len: int) -> tuple[np.ndarray, int]:
    """Return which of the 2L window slots contain a key after `context` tokens, and how
    many tokens the compressed cache contains.

    The second half of the window contains the block of the last token consumed, and the
    first half the block before it. `vq_decode_step` rolls the window when the next token
    starts a block, so a block that was just completed is still in the second half.
    """
    L = block_len
    last_block, last_offset = divmod(context - 1, L)
    filled = np.zeros(2 * L, bool)
    filled[L : L + last_offset + 1] = True
    if last_block >= 1:
        filled[:L] = True
    cached_tokens = max(last_block - 1, 0) * L
    return filled, cached_tokens


def _random_values(
    rng: np.random.Generator, shape, dtype, filled: np.ndarray, axis: int
) -> jnp.ndarray:
    """Return normal values of dtype, zero in the slots along `axis` where filled is False."""
    values = rng.standard_normal(shape, dtype=np.float32)
    mask_shape = [1] * len(shape)
    mask_shape[axis] = filled.size
    values *= filled.reshape(mask_shape)
    return jnp.asarray(values, dtype)


def _position_vq(state: dict, context: int, block_len: int, n_code: int, seed: int) -> dict:
    filled, cached_tokens = vq_window_layout(context, block_len)
    rng = np.random.default_rng(seed)
    k_window, v_window, z_window = state["k_window"], state["v_window"], state["z_window"]
    codes = rng.integers(0, n_code, size=z_window.shape, dtype=np.int32) * filled

    # Counts per code of the cached tokens of every layer, sequence and head. Like the
    # real counts, they sum to the number of cached tokens.
    counts = rng.multinomial(
        cached_tokens, np.full(n_code, 1.0 / n_code), size=state["counts"].shape[:-1]
    ).astype(np.float32)
    means = rng.standard_normal(state["sums"].shape, dtype=np.float32)
    return {
        **state,
        "k_window": _random_values(rng, k_window.shape, k_window.dtype, filled, axis=-2),
        "v_window": _random_values(rng, v_window.shape, v_window.dtype, filled, axis=-2),
        "z_window": jnp.asarray(codes, z_window.dtype),
        "counts": jnp.asarray(counts, state["counts"].dtype),
        "sums": jnp.asarray(counts[..., None] * means, state["sums"].dtype),
    }


def _position_full(state: dict, context: int, seed: int) -> dict:
    k_cache, v_cache = state["k_cache"], state["v_cache"]
    capacity = k_cache.shape[-2]
    if context >= capacity:
        raise ConfigError(
            f"context {context} does not fit the key/value cache of {capacity} positions"
        )
    filled = np.arange(capacity) < context
    rng = np.random.default_rng(seed)
    return {
        **state,
        "k_cache": _random_values(rng, k_cache.shape, k_cache.dtype, filled, axis=-2),
        "v_cache": _random_values(rng, v_cache.shape, v_cache.dtype, filled, axis=-2),
    }


def position_state(cache: Cache, config: TransformerConfig, context: int, seed: int = 0) -> Cache:
    """Return `cache`, a fresh state from `Decoder.start`, as if `context` tokens had been
    consumed: positions set to context and random contents laid out as in a real state.

    Every leaf keeps its shape and dtype. The leaves of the scanned layer stack carry a
    leading n_layer axis.
    """
    check_contexts([context])
    layers = dict(cache["layers"])
    for index, (name, state) in enumerate(sorted(cache["layers"].items())):
        state = {**state, "position": jnp.full_like(state["position"], context)}
        if config.attn_type == "full":
            layers[name] = _position_full(state, context, seed + index)
        else:
            layers[name] = _position_vq(
                state, context, config.block_len, config.n_code, seed + index
            )
    positioned = {**cache, "layers": layers}
    # With absolute position embeddings the model keeps its own position counter.
    if "position" in cache:
        positioned["position"] = jnp.full_like(cache["position"], context)
    return positioned


def init_variables(config: TransformerConfig, seed: int = 0) -> dict:
    """Return random parameters and codebook of `Transformer(config)`.

    The parameters do not depend on the attention type, so one initialisation of the vq
    model serves the full one as well, which has no codebook.
    """
    tokens = jnp.zeros((1, config.sequence_len), jnp.int32)
    return jax.jit(Transformer(config).init)(jax.random.PRNGKey(seed), tokens)


def _compile_generate(decoder: Decoder, cache_shapes: Cache, steps: int, key: jax.Array):
    """Compile the program `decoder.generate(cache, logits, key, 0, steps)` runs, for the
    state's shapes only, so that a state too large to fit is never allocated.

    The arguments mirror those `Decoder.generate` passes to its jitted function.
    Compiling ahead of time fills the cache that `generate` looks up (checked with JAX
    0.10.2), so its first call does not compile again. If another version compiles
    again, the untimed warm-up call absorbs it.
    """
    B, N = decoder.batch_size, decoder.config.n_vocab
    settings = (
        jnp.asarray(1.0, jnp.float32), jnp.asarray(0, jnp.int32), jnp.asarray(1.0, jnp.float32)
    )
    return decoder._generate.lower(
        decoder.variables, cache_shapes, jax.ShapeDtypeStruct((B, N), jnp.float32), key,
        jnp.asarray(0, jnp.int32), settings, length=steps,
    ).compile()


def bench_one(
    row: Row,
    config: TransformerConfig,
    variables: dict,
    *,
    repeats: int,
    budget_s: float,
    max_memory_bytes: float,
    seed: int = 0,
) -> Row:
    """Compile and time one configuration, filling row; failures become its status.

    `variables` come from `init_variables`; the codebook is used only by VQ attention.
    """
    B, steps = row.batch_size, row.steps
    # Room for the context and the generated tokens, and one spare position.
    capacity = row.context + steps + 1
    key = jax.random.PRNGKey(seed)
    try:
        if config.attn_type == "full":
            variables = {"params": variables["params"]}
        decoder = Decoder(config, variables, B, capacity)
        cache_shapes = jax.eval_shape(decoder.start)
        row.state_bytes = tree_bytes(cache_shapes)

        start = time.perf_counter()
        compiled = _compile_generate(decoder, cache_shapes, steps, key)
        row.compile_s = time.perf_counter() - start

        # The CPU backend has no allocator limit of its own: past the host's memory the
        # kernel kills the process, so a program that cannot fit is not run at all.
        estimate = _compiled_bytes(compiled)
        row.peak_memory_bytes, row.memory_source = estimate, "compiled"
        if estimate > max_memory_bytes:
            row.status = "out of memory"
            return row

        cache = position_state(decoder.start(), config, row.context, seed)
        logits = jnp.zeros((B, config.n_vocab), jnp.float32)

        def run_step() -> None:
            # Every call starts from the same state, so each one decodes from the context.
            jax.block_until_ready(decoder.generate(cache, logits, key, 0, steps))

        seconds = time_steps(run_step, repeats, budget_s)
        # NOTE: the device's peak is the process's high-water mark, so after a larger
        # configuration it overstates a smaller one.
        peak = _device_peak_bytes()
        if not math.isnan(peak):
            row.peak_memory_bytes, row.memory_source = peak, "device"
    except Exception as error:  # noqa: BLE001 - any backend failure becomes a row
        row.status = failure_status(error)
        return row
    finally:
        jax.clear_caches()

    timing = SimpleNamespace(status=row.status)
    record_step_times(timing, seconds)
    row.status, row.repeats = timing.status, timing.repeats
    row.ms_per_token_median = 1e3 * timing.step_s_median / steps
    row.ms_per_token_min = 1e3 * timing.step_s_min / steps
    row.ms_per_token_max = 1e3 * timing.step_s_max / steps
    row.tokens_per_s = B / (row.ms_per_token_median / 1e3)
    return row


def set_relative_latencies(rows: list[Row]) -> None:
    """Set each row's latency_vs_first against the shortest timed context of its head and
    attention type. Rows without a timing get nan."""
    shortest: dict[tuple[str, str], Row] = {}
    for r in sorted(rows, key=lambda r: r.context):
        if not math.isnan(r.ms_per_token_median):
            shortest.setdefault((r.head_type, r.attn_type), r)
    for r in rows:
        base = shortest.get((r.head_type, r.attn_type))
        if base is not None:
            r.latency_vs_first = r.ms_per_token_median / base.ms_per_token_median


HEADER = (
    f"{'attn':<5} {'head':<5} {'context':>7} {'B':>3} {'steps':>5} "
    f"{'ms/token (min-max)':>26} {'tokens/s':>9} {'state MiB':>10} {'peak MiB':>9} "
    f"{'vs first':>8} {'compile s':>9}  status"
)


def format_row(r: Row) -> str:
    spread = f"{r.ms_per_token_median:.3f} ({r.ms_per_token_min:.3f}-{r.ms_per_token_max:.3f})"
    return (
        f"{r.attn_type:<5} {r.head_type:<5} {r.context:>7} {r.batch_size:>3} {r.steps:>5} "
        f"{spread:>26} {r.tokens_per_s:>9.1f} {r.state_bytes / MIB:>10.2f} "
        f"{r.peak_memory_bytes / MIB:>9.1f} {r.latency_vs_first:>8.2f} {r.compile_s:>9.2f}  "
        f"{r.status}"
    )


def run(
    *,
    attn_types: list[str] | None = None,
    head_types: list[str] | None = None,
    contexts: list[int] | None = None,
    steps: int | None = None,
    batch_size: int = 1,
    widths: dict | None = None,
    repeats: int = 3,
    budget_s: float = 300.0,
    max_memory_gib: float | None = None,
    seed: int = 0,
    out: Path | None = None,
    log=print,
) -> list[Row]:
    """Time every configuration, logging each row as it finishes; write the CSV file.

    `widths` updates the cpu preset's model widths (keys of CPU_PRESET_WIDTHS). `steps`
    defaults to two block lengths, so that every timed call crosses the block boundaries
    where the VQ window rolls into the cache.
    """
    attn_types = list(attn_types or ["vq", "full"])
    # Each head type once, in the order given.
    head_types = list(dict.fromkeys(head_types or ["shga"]))
    contexts = list(contexts or DEFAULT_CONTEXTS)
    widths = dict(widths or {})
    check_contexts(contexts)
    # Shortest first, so that each row's latency_vs_first is known when it is logged.
    contexts = sorted(set(contexts))
    for attn in attn_types:
        if attn not in ("vq", "full"):
            raise ConfigError(f"unknown attention type {attn!r}; use vq or full")
    # Built before any timing, so that an invalid width fails at once.
    configs = {
        (head, attn): model_config(head, attn, **widths)
        for head in head_types
        for attn in attn_types
    }
    first = next(iter(configs.values()))
    steps = steps if steps is not None else 2 * first.block_len
    check_contexts(contexts, steps)
    if steps <= 0:
        raise ConfigError(f"steps must be a positive number of tokens, got {steps}")

    if max_memory_gib is None:
        max_memory_bytes = 0.8 * host_memory_bytes()
    else:
        max_memory_bytes = max_memory_gib * 2**30
    device = jax.local_devices()[0]
    log(f"devices: {jax.device_count()} x {getattr(device, 'device_kind', device)} "
        f"({jax.default_backend()})")
    log(
        f"model: d_model {first.d_model}, d_k {first.d_k}, n_code {first.n_code}, "
        f"n_layer {first.n_layer}, block_len {first.block_len}, {first.dtype}; "
        f"{steps} tokens per timed call, batch {batch_size}"
    )
    log(HEADER)

    rows = []
    for head in head_types:
        init_status = "ok"
        try:
            variables = init_variables(model_config(head, "vq", **widths), seed)
        except Exception as error:  # noqa: BLE001 - every row of this head records it
            init_status = failure_status(error)
        for attn in attn_types:
            config = configs[(head, attn)]
            for context in contexts:
                row = Row(
                    attn_type=attn, head_type=head, dtype=config.dtype, context=context,
                    batch_size=batch_size, steps=steps, status=init_status,
                )
                if init_status == "ok":
                    bench_one(
                        row, config, variables, repeats=repeats, budget_s=budget_s,
                        max_memory_bytes=max_memory_bytes, seed=seed,
                    )
                rows.append(row)
                set_relative_latencies(rows)
                log(format_row(row))

    if out is not None:
        write_csv(out, [asdict(r) for r in rows], COLUMNS)
        log(f"wrote {len(rows)} rows to {out}")
    return rows
