"""Transformer-VQ model: config, Flax modules and attention kernels."""

from tvq.model.config import ConfigError, TransformerConfig
from tvq.model.transformer import Transformer

__all__ = ["ConfigError", "Transformer", "TransformerConfig"]
