"""The demo's training run (what ``ovla-jax demo`` trains): a tiny OpenVLA on the built-in tabletop
demonstrations. Build the dataset first (``ovla-jax demo`` does), then e.g.
``ovla-jax train --config configs/train/demo.py --workdir runs/tabletop --config.num_steps=10000``."""
import os

from ovla_jax.demo import demo_config


def get_config():
    return demo_config(os.path.join(os.getcwd(), "workdir", "demo", "data"), steps=3000)
