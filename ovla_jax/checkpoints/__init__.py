"""Checkpoint formats: the HF PyTorch layout (hf.py) and ovla-jax's own (jax_format.py)."""
