"""Evaluation: metrics from summed losses, and scoring whole splits."""
