#!/usr/bin/env python
"""Convert OpenVLA checkpoints: HF PyTorch layout <-> ovla-jax. Same arguments as ``ovla-jax convert``.

    python tools/convert_weights.py --from hf --to jax /path/openvla-7b /path/openvla-7b-jax
    python tools/convert_weights.py --from jax --to hf /path/ckpt /path/ckpt-hf --dtype bfloat16
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ovla_jax.convert import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
