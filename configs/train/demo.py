"""The demo's training runs (what ``ovla-jax demo`` trains): tiny policies on the built-in tabletop
demonstrations. ``:oft`` (default) is the OpenVLA-OFT policy (L1 head, chunk 8, wrist camera + proprio),
``:openvla`` the autoregressive OpenVLA. Build the dataset first (``ovla-jax demo`` does), then e.g.
``ovla-jax train --config configs/train/demo.py:oft --workdir runs/tabletop --config.num_steps=10000``."""
import os

from ovla_jax.demo import demo_config


def get_config(policy: str = "oft"):
    return demo_config(os.path.join(os.getcwd(), "workdir", "demo", "data"), steps=3000, policy=policy)
