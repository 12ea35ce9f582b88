"""ovla-jax: OpenVLA in JAX/Flax.

Data flows RLDS -> data/ -> train/ -> checkpoints/ -> policy; see ../shared/DESIGN.md.
"""
from ovla_jax.platform import quiet_libtpu as _quiet_libtpu

_quiet_libtpu()  # before any JAX backend starts: no libtpu errors on CPU hosts with the [tpu] extra

__version__ = "0.1.0"
