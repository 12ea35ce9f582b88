"""ovla-jax: OpenVLA in JAX/Flax.

Data flows RLDS -> data/ -> train/ -> checkpoints/ -> policy; see ../shared/DESIGN.md.
"""

__version__ = "0.1.0"
