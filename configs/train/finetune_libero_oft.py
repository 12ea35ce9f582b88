"""Fine-tune OpenVLA-7B into OpenVLA-OFT on a LIBERO suite, OFT's recipe: parallel decoding, chunks of 8
from the L1 head, third-person + wrist camera, 8-D proprio; LoRA rank 32 (alpha 16) on every linear
layer of the backbone with the heads trained fully; lr 5e-4, x0.1 after 100k steps; batch 8 per GPU in
OFT (64 here, global). ``:spatial`` (default) | ``:object`` | ``:goal`` | ``:10`` picks the suite;
``--config.model.film=True`` is OFT+. Set ``--config.init_checkpoint`` to a converted openvla-7b (its
backbone; the OFT fields below are kept), ``--config.tokenizer`` to its tokenizer files and
``--config.data.data_dir`` to the directory holding ``libero_<suite>_no_noops``.
"""
from configs.train.common import base_config

SUITES = ("spatial", "object", "goal", "10")


def get_config(suite: str = "spatial"):
    if suite not in SUITES:
        raise ValueError(f"finetune_libero_oft variant {suite!r}: use one of {SUITES}")
    c = base_config("7b-oft-libero")
    c.data.mixture = f"libero_{suite}_no_noops"
    c.max_length = 96 + 8 * 7 + 1  # the prompt + 56 action slots + the stop token
    c.num_steps = 150_000
    c.save_every = 10_000
    c.eval_every = 0
    c.remat = "dots"
    c.scan_layers = True
    c.mode = "lora"
    c.lora.rank, c.lora.dropout = 32, 0.0  # alpha: min(rank, 16) = 16, as OFT
    c.batch_size = 64
    c.optimizer.lr = 5e-4
    c.optimizer.schedule = "step_decay"
    c.optimizer.decay_steps = 100_000
    return c
