"""Fine-tune OpenVLA-7B on BridgeData V2: ``:full`` (all weights) or ``:lora`` (adapters, the default).

LoRA as upstream's ``vla-scripts/finetune.py``: rank 32, alpha min(rank, 16), dropout 0, all linear
layers, lr 5e-4, batch 16. Full fine-tuning uses lr 2e-5 as pretraining. Set
``--config.init_checkpoint`` to a converted openvla-7b, ``--config.tokenizer`` to its tokenizer files,
and ``--config.data.data_dir`` to the directory that holds ``bridge_orig`` (or ``bridge_dataset``).
"""
from configs.train.common import base_config


def get_config(mode: str = "lora"):
    if mode not in ("lora", "full"):
        raise ValueError(f"finetune_bridge variant {mode!r}: use :lora or :full")
    c = base_config("7b")
    c.data.mixture = "bridge_orig"
    c.num_steps = 200_000
    c.save_every = 5000
    c.eval_every = 5000
    c.remat = "dots"
    c.scan_layers = True
    if mode == "lora":
        c.mode = "lora"
        c.lora.rank, c.lora.dropout = 32, 0.0  # alpha: min(rank, 16) = 16
        c.batch_size = 16
        c.optimizer.lr = 5e-4
    else:
        c.mode = "full"
        c.batch_size = 256
        c.optimizer.lr = 2e-5
    return c
