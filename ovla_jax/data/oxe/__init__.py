"""Open X-Embodiment: the dataset registry, per-dataset standardization, named mixtures."""
