"""Training: optimizer and fine-tuning modes, the loss, the sharded train step (loop and checkpoints
arrive next)."""
