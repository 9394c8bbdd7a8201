"""Model configuration: one frozen dataclass, validated on construction.

Field names follow the official Transformer-VQ configs so that those configs port
directly. Shape letters used across `tvq.model`:

    B batch, T sequence length, L block length, R = T / L blocks, D model width,
    K key width, V value width, S codebook size, H query heads, h key/value heads,
    G = H / h query heads per key/value head, N vocabulary size.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

ATTN_TYPES = ("vq", "full", "vq_quadratic")
HEAD_TYPES = ("shga", "mqa", "mha")
REDUCTION_TYPES = ("serial", "matmul", "assoc_scan")
REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a Transformer-VQ language model."""

    # Vocabulary size N: 259 for bytes plus the pad, eos and unk ids.
    n_vocab: int = 259
    # Model width D.
    d_model: int = 768
    # Key (and query) width K per head; mqa and mha use D / K query heads.
    d_k: int = 128
    # Codebook size S per key/value head.
    n_code: int = 512
    # Number of layers; an shga layer has two attention sublayers and no MLP.
    n_layer: int = 24
    # Block length L: keys older than one block are read through the compressed cache.
    block_len: int = 512
    # Training and evaluation sequence length T, a multiple of block_len with T / L >= 3.
    sequence_len: int = 8192
    # "vq" (linear time), "full" (quadratic baseline on unquantised keys) or
    # "vq_quadratic" (the same VQ attention with T x T scores: the test oracle).
    attn_type: str = "vq"
    # "shga" (one gated head, V = 2D), "mqa" (D / K query heads, one key/value head)
    # or "mha" (D / K query and key/value heads).
    head_type: str = "shga"
    # How the compressed cache is summed over blocks: "serial" (scan), "matmul"
    # (one lower-triangular matmul) or "assoc_scan" (parallel prefix sum).
    reduction_type: str = "matmul"
    # Add absolute sinusoidal position embeddings with a learned scale initialised at 0.
    pe_abs: bool = False
    # Base wavelength of the sinusoidal position features.
    pe_lam: float = 10_000.0
    # Dropout on the sinusoidal position features.
    p_dropsin: float = 0.0
    # Dropout on each sublayer's output before the residual addition.
    p_dropres: float = 0.0
    # Probability of dropping a whole sublayer for one sequence (stochastic depth).
    p_droplyr: float = 0.0
    # Weight of the commitment loss that pulls keys towards their codewords.
    c_beta: float = 1e-4
    # Decay rate of the codebook's exponential moving averages.
    c_gamma: float = 0.99
    # Tie the output projection to the input embedding.
    e_tie: bool = False
    # RMS-normalise the final hidden state before the output projection.
    e_preln: bool = False
    # Multiplier applied to the output logits.
    e_scale: float = 1.0
    # Parameter dtype; codebook statistics are always float32.
    param_dtype: str = "float32"
    # Activation dtype; softmax, the VQ argmin and the cache sums are always float32.
    dtype: str = "bfloat16"
    # Rematerialisation of each layer in the backward pass: "none" keeps all
    # activations, "full" keeps only the layer inputs, "save_dots" keeps the outputs
    # of the dense projections and recomputes attention scores and elementwise work.
    remat: str = "save_dots"

    def __post_init__(self) -> None:
        errors = validation_errors(self)
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def n_block(self) -> int:
        """Number of blocks R per sequence."""
        return self.sequence_len // self.block_len

    @property
    def n_head(self) -> int:
        """Number of query heads H."""
        return 1 if self.head_type == "shga" else self.d_model // self.d_k

    @property
    def n_kv_head(self) -> int:
        """Number of key/value heads h."""
        return self.n_head if self.head_type == "mha" else 1

    @property
    def d_v(self) -> int:
        """Value width V per head."""
        return 2 * self.d_model if self.head_type == "shga" else self.d_k

    @property
    def d_ff(self) -> int:
        """MLP hidden width (0 for shga, which has no MLP)."""
        return {"shga": 0, "mqa": 5 * self.d_model, "mha": 4 * self.d_model}[self.head_type]

    @property
    def activation_dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> TransformerConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransformerConfig:
        """Build a config, raising ConfigError on keys that are not fields."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(
                f"unknown model config key(s) {', '.join(unknown)}; "
                f"valid keys are: {', '.join(sorted(names))}"
            )
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TransformerConfig:
        """Load a YAML mapping of fields, then apply keyword overrides."""
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"model config file {path} not found") from None
        if not isinstance(values, dict):
            raise ConfigError(f"model config file {path} must contain a mapping of keys")
        return cls.from_dict({**values, **overrides})


def validation_errors(config: TransformerConfig) -> list[str]:
    """List every problem with a config, one message each, in a fixed order."""
    errors = []
    choices = {
        "attn_type": ATTN_TYPES,
        "head_type": HEAD_TYPES,
        "reduction_type": REDUCTION_TYPES,
        "remat": REMAT_POLICIES,
        "dtype": DTYPES,
        "param_dtype": DTYPES,
    }
    for key, allowed in choices.items():
        value = getattr(config, key)
        if value not in allowed:
            errors.append(f"unknown {key} {value!r}; choose one of {', '.join(allowed)}")

    sizes_valid = True
    for key in ("n_vocab", "d_model", "d_k", "n_code", "n_layer", "block_len", "sequence_len"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            errors.append(f"{key} must be a positive integer, got {value!r}")
            sizes_valid = False

    # Divisibility only makes sense once every size is a positive integer.
    if sizes_valid and config.sequence_len % config.block_len != 0:
        errors.append(
            f"sequence_len {config.sequence_len} is not a multiple of block_len "
            f"{config.block_len}; pick sequence_len = R * block_len"
        )
    elif sizes_valid and config.sequence_len // config.block_len < 3:
        errors.append(
            f"sequence_len {config.sequence_len} holds "
            f"{config.sequence_len // config.block_len} block(s) of {config.block_len}; "
            "at least 3 are needed, so lower block_len or raise sequence_len"
        )
    if sizes_valid and config.head_type in ("mqa", "mha") and config.d_model % config.d_k != 0:
        errors.append(
            f"d_model {config.d_model} is not a multiple of d_k {config.d_k}, "
            f"which head_type {config.head_type!r} needs to form d_model / d_k heads"
        )
    for key in ("pe_abs", "e_tie", "e_preln"):
        if not isinstance(getattr(config, key), bool):
            errors.append(f"{key} must be true or false, got {getattr(config, key)!r}")
    numbers_valid = True
    for key in ("pe_lam", "p_dropsin", "p_dropres", "p_droplyr", "c_beta", "c_gamma", "e_scale"):
        value = getattr(config, key)
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value):
            errors.append(f"{key} must be a finite number, got {value!r}")
            numbers_valid = False
    if not numbers_valid:
        return errors

    for key in ("p_dropsin", "p_dropres", "p_droplyr"):
        value = getattr(config, key)
        if not 0.0 <= value < 1.0:
            errors.append(f"{key} must be in [0, 1), got {value!r}")
    if not 0.0 <= config.c_gamma < 1.0:
        errors.append(f"c_gamma must be in [0, 1), got {config.c_gamma!r}")
    if config.c_beta < 0.0:
        errors.append(f"c_beta must be non-negative, got {config.c_beta!r}")
    if config.pe_lam <= 0.0:
        errors.append(f"pe_lam must be positive, got {config.pe_lam!r}")
    return errors
