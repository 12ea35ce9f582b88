"""XLA options for the programs that loop over large weights (scanned layers, the decode loop).

XLA:CPU's while-loop-invariant code motion hoists work on loop-invariant weights out of the loop:
measured on the 7B (``jax.jit(...).lower(...).compile().memory_analysis()``, jax 0.10), the bf16
prefill with scanned layers converted every stacked kernel to f32 before the layer loop (27.3 GiB of
temporaries beside 14.0 GiB of weights; 0.9 GiB without the pass), and the int8 decode dequantized
kernels ahead of the loop that used them. Hoisting trades memory for a little time; with weights
that are most of the machine's memory, it is the wrong trade. Compiled for a TPU v5e chip the same
programs hoist nothing of the kind (bf16 and int8 decode: the same temporaries with the pass on or off;
int4: 1.74 vs 1.45 GiB), so the pass stays on for accelerators.
"""
from __future__ import annotations

from typing import Optional

NO_HOISTING = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def weight_loop_options(platform: Optional[str] = None) -> Optional[dict]:
    """``compiler_options`` for ``jax.jit`` of a program that loops over weights on ``platform``
    (default: JAX's default backend)."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    return dict(NO_HOISTING) if platform == "cpu" else None
