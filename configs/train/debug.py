"""A tiny OpenVLA trained from scratch on the 25-episode Bridge sample in ../shared (minutes on a laptop
CPU): the same pipeline, step and checkpoints as real training. ``:lora`` trains adapters instead."""
import os

from configs.train.common import base_config

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


def get_config(mode: str = "full"):
    c = base_config("tiny")
    c.data.data_dir = os.path.abspath(SAMPLE)
    c.data.mixture = "bridge_dataset"
    c.data.shuffle_buffer = 1000
    c.data.threads = 2
    c.data.augment = False
    c.max_length = 160  # the character tokenizer spends a token per character
    c.batch_size = 16
    c.num_steps = 60
    c.dtype = "float32"
    c.optimizer.lr = 3e-3
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 5
    c.optimizer.weight_decay = 0.01
    c.log_every = 5
    c.eval_every = 30
    c.eval_batches = 2
    c.save_every = 20
    c.keep = 2
    if mode == "lora":
        c.mode = "lora"
        c.lora.rank = 8  # alpha min(rank, 16) = 8: scale 1, as upstream
    elif mode != "full":
        raise ValueError(f"debug variant {mode!r}: use :full or :lora")
    return c
