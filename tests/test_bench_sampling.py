"""`tvq bench sampling`: rows for every configuration and decoding states placed at a context."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from tests.runs import run_tvq
from tvq.bench import sampling
from tvq.bench.sampling import COLUMNS
from tvq.model.config import ConfigError
from tvq.sampling.decoder import Decoder

WIDTHS = {"d_model": 32, "d_k": 16, "n_code": 16, "n_layer": 2, "block_len": 16}
CLI_WIDTHS = (
    "--d-model", "32", "--d-k", "16", "--n-code", "16", "--n-layer", "2", "--block-len", "16",
)
CONTEXTS = [64, 256]
STEPS = 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows():
    return sampling.run(
        contexts=CONTEXTS, steps=STEPS, widths=WIDTHS, repeats=2, log=lambda line: None
    )


@pytest.fixture(scope="module")
def variables():
    return sampling.init_variables(sampling.model_config("shga", "vq", **WIDTHS))


@pytest.fixture(scope="module")
def decoders(variables):
    """One decoder per attention type, for two sequences of up to 128 tokens."""
    return {attn: decoder_for(attn, variables, 128) for attn in ("vq", "full")}


def decoder_for(attn_type: str, variables: dict, capacity: int, batch_size: int = 2) -> Decoder:
    config = sampling.model_config("shga", attn_type, **WIDTHS)
    return Decoder(config, variables, batch_size, capacity)


def shapes_of(tree):
    return jax.tree_util.tree_map(lambda leaf: (leaf.shape, leaf.dtype), tree)


def test_rows_well_formed(rows):
    assert [(r.attn_type, r.context) for r in rows] == [
        ("vq", 64), ("vq", 256), ("full", 64), ("full", 256)
    ]
    for r in rows:
        assert r.status == "ok", r
        assert r.head_type == "shga"
        assert r.dtype == "float32"
        assert r.batch_size == 1
        assert r.steps == STEPS
        assert r.repeats == 2
        assert r.compile_s > 0
        assert r.ms_per_token_min <= r.ms_per_token_median <= r.ms_per_token_max
        assert r.tokens_per_s == pytest.approx(1e3 / r.ms_per_token_median)
        assert r.state_bytes > 0
        assert r.peak_memory_bytes > r.state_bytes
        assert r.memory_source == "compiled"
    by_key = {(r.attn_type, r.context): r for r in rows}
    for attn in ("vq", "full"):
        assert by_key[(attn, 64)].latency_vs_first == 1.0
        expected = by_key[(attn, 256)].ms_per_token_median / by_key[(attn, 64)].ms_per_token_median
        assert by_key[(attn, 256)].latency_vs_first == pytest.approx(expected)


def test_vq_state_constant_full_grows(rows, variables):
    by_key = {(r.attn_type, r.context): r for r in rows}
    assert by_key[("vq", 64)].state_bytes == by_key[("vq", 256)].state_bytes
    assert by_key[("full", 256)].state_bytes > by_key[("full", 64)].state_bytes
    # The key/value cache of full attention has context + steps + 1 positions.
    fresh = decoder_for("full", variables, 256 + STEPS + 1, batch_size=1)
    assert by_key[("full", 256)].state_bytes == sampling.tree_bytes(jax.eval_shape(fresh.start))


def test_default_widths_match_cpu_preset():
    preset = yaml.safe_load((REPO / "config/presets/cpu.yaml").read_text())
    for key, value in sampling.CPU_PRESET_WIDTHS.items():
        assert preset[key] == value, key


@pytest.mark.parametrize("attn_type", ["vq", "full"])
@pytest.mark.parametrize("context", [64, 72])
def test_positioned_state_decodes(decoders, variables, attn_type, context):
    decoder = decoders[attn_type]
    fresh = decoder.start()
    cache = sampling.position_state(fresh, decoder.config, context)
    assert shapes_of(cache) == shapes_of(fresh)

    logits = jnp.zeros((2, decoder.config.n_vocab), jnp.float32)
    cache, logits, tokens = decoder.generate(cache, logits, jax.random.PRNGKey(0), 0, STEPS)
    assert tokens.shape == (2, STEPS)
    assert int(tokens.min()) >= 0
    assert int(tokens.max()) < decoder.config.n_vocab
    assert bool(jnp.isfinite(logits).all())
    for state in cache["layers"].values():
        np.testing.assert_array_equal(state["position"], context + STEPS)
    if attn_type == "vq":
        # A VQ state keeps its size, so the decoded state has the shapes of a fresh one
        # of any capacity.
        other = decoder_for("vq", variables, 1)
        assert shapes_of(cache) == shapes_of(jax.eval_shape(other.start))


def test_vq_layout_matches_real_decoding(decoders):
    decoder = decoders["vq"]
    L = decoder.config.block_len
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 3 * L), 0, decoder.config.n_vocab)
    real = decoder.start()
    consumed = 0
    # Inside the first block, at a block's end with nothing cached yet, inside a block
    # with one block cached, and at a block's end with one block cached.
    for context in (5, 2 * L, 2 * L + 8, 3 * L):
        real, _ = decoder.consume(real, tokens[:, consumed:context])
        consumed = context
        positioned = sampling.position_state(decoder.start(), decoder.config, context)
        filled, cached_tokens = sampling.vq_window_layout(context, L)

        for name, state in real["layers"].items():
            mine = positioned["layers"][name]
            np.testing.assert_array_equal(mine["position"], state["position"])
            # An empty slot is all zeros, and one with a token, real or random, is not.
            real_filled = np.asarray(jnp.any(state["v_window"] != 0, axis=-1))
            my_filled = np.asarray(jnp.any(mine["v_window"] != 0, axis=-1))
            np.testing.assert_array_equal(
                real_filled, np.broadcast_to(filled, real_filled.shape), err_msg=str(context)
            )
            np.testing.assert_array_equal(my_filled, real_filled, err_msg=str(context))
            np.testing.assert_array_equal(np.asarray(state["counts"]).sum(-1), cached_tokens)
            np.testing.assert_array_equal(np.asarray(mine["counts"]).sum(-1), cached_tokens)


def empty_row(attn_type: str) -> sampling.Row:
    return sampling.Row(
        attn_type=attn_type, head_type="shga", dtype="float32", context=64, batch_size=1,
        steps=STEPS,
    )


def test_over_budget_row(variables):
    row = sampling.bench_one(
        empty_row("vq"), sampling.model_config("shga", "vq", **WIDTHS), variables,
        repeats=3, budget_s=1e-9, max_memory_bytes=2**30,
    )
    # The warm-up call is the one sample when the budget runs out during it.
    assert row.status == "over budget"
    assert row.repeats == 1
    assert math.isfinite(row.ms_per_token_median)
    assert row.ms_per_token_min == row.ms_per_token_median


def test_out_of_memory_row(variables):
    row = sampling.bench_one(
        empty_row("full"), sampling.model_config("shga", "full", **WIDTHS), variables,
        repeats=3, budget_s=60, max_memory_bytes=1024,
    )
    assert row.status == "out of memory"
    assert row.repeats == 0
    assert math.isnan(row.ms_per_token_median)
    assert math.isnan(row.tokens_per_s)
    # The compiled program's size that did not fit is recorded.
    assert row.peak_memory_bytes > 1024


def test_cli_writes_csv(tmp_path):
    out = tmp_path / "results" / "sampling.csv"
    result = run_tvq(
        "bench", "sampling", *CLI_WIDTHS, "--contexts", "64", "--steps", str(STEPS),
        "--repeats", "1", "--out", out,
    )
    assert result.returncode == 0, result.stderr
    assert "ms/token" in result.stdout

    with out.open(newline="") as handle:
        reader = csv.DictReader(handle)
        records = list(reader)
    assert reader.fieldnames == COLUMNS
    assert [(r["attn_type"], r["context"]) for r in records] == [("vq", "64"), ("full", "64")]
    for record in records:
        assert record["status"] == "ok", record
        assert record["repeats"] == "1"
        assert float(record["ms_per_token_median"]) > 0


@pytest.mark.parametrize("context", ["0", "-8"])
def test_cli_rejects_bad_context(tmp_path, context):
    out = tmp_path / "results" / "sampling.csv"
    result = run_tvq(
        "bench", "sampling", *CLI_WIDTHS, "--contexts", "64", context, "--out", out
    )
    assert result.returncode == 1
    assert "context lengths" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


def test_contexts_past_int32_positions_are_rejected():
    with pytest.raises(ConfigError, match=r"context lengths \[2147483648\] plus 128 steps"):
        sampling.check_contexts([1024, 2**31], 128)
