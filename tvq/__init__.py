"""tvq: a reproducible pipeline for Transformer-VQ (Lingle, ICLR 2024)."""

from tvq.model import ConfigError, Transformer, TransformerConfig

__version__ = "0.1.0"

__all__ = ["ConfigError", "Transformer", "TransformerConfig", "__version__"]
