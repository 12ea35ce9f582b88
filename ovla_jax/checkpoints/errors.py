"""The one exception type for unusable checkpoints: its message names the file, key and shapes."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked (missing/extra/mis-shaped tensor, bad config,
    corrupt file, unsupported architecture)."""
