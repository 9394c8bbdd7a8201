"""Sampling from a trained model with incremental decoding (`tvq sample`)."""
