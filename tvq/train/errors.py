"""Errors of training and checkpointing, importable without JAX for the command line."""


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not belong to this run."""


class TrainingError(Exception):
    """A run that cannot go on, such as a loss that became NaN."""
