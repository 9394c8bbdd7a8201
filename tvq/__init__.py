"""tvq: a reproducible pipeline for Transformer-VQ (Lingle, ICLR 2024)."""

__version__ = "0.1.0"

__all__ = ["ConfigError", "Transformer", "TransformerConfig", "__version__"]


def __getattr__(name: str):
    # The model imports JAX, which takes seconds; data commands and `--help` never need it.
    if name in ("ConfigError", "Transformer", "TransformerConfig"):
        import tvq.model

        return getattr(tvq.model, name)
    raise AttributeError(f"module 'tvq' has no attribute {name!r}")
