"""Transformer-VQ model: config, Flax modules and attention kernels."""

from tvq.model.config import ConfigError, TransformerConfig

__all__ = ["ConfigError", "Transformer", "TransformerConfig"]


def __getattr__(name: str):
    # Flax and JAX load only when the model itself is used, not for configs or the CLI.
    if name == "Transformer":
        from tvq.model.transformer import Transformer

        return Transformer
    raise AttributeError(f"module 'tvq.model' has no attribute {name!r}")
