"""Training: optimiser, learning-rate schedules and the training loop."""
