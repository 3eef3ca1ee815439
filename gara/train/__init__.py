"""Training: losses, batches, the Ray Train loop and its launcher."""
