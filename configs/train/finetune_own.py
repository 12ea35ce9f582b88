"""Fine-tune on your own robot data, declared in a spec file (``ovla-jax import`` writes one):

    ovla-jax train --config configs/train/finetune_own.py:lora --dataset-spec data/my_robot.yaml \\
        --config.data.data_dir=data --config.init_checkpoint=/ckpts/openvla-7b-jax \\
        --config.tokenizer=/ckpts/openvla-7b --workdir runs/my_robot

Variants:
- ``:lora`` (default): OpenVLA-7B + LoRA rank 32, upstream's fine-tuning recipe (lr 5e-4, batch 16),
  one camera, 7 action tokens; set ``init_checkpoint`` (a converted openvla-7b) and ``tokenizer``.
- ``:oft``: OpenVLA-OFT on the 7B: L1 head over chunks of 8, third-person + wrist camera, a proprio
  token and FiLM, LoRA; set ``--config.model.proprio_dim`` / ``action_dim`` to your state / action
  widths (a mismatch is a named error).
- ``:tiny``: the OFT layout on a tiny model trained from scratch in minutes on a CPU: to try your data
  and the whole path (stats, train, offline eval, export, serve) before spending GPU hours.

The dataset: ``data.mixture`` is left empty, so the one dataset given with ``--dataset-spec`` (or in
``data.dataset_specs``) is trained on; without a ``val`` split 5% of its episodes are held out for
validation. Put this in a config file of your own to keep the settings:

    from configs.train.finetune_own import get_config as own

    def get_config(variant="tiny"):
        c = own(variant)
        c.data.dataset_specs = ("data/my_robot.yaml",)
        c.data.data_dir = "data"
        return c
"""
from configs.train.common import base_config

VARIANTS = ("lora", "oft", "tiny")
TINY_OFT = dict(action_head="l1", chunk=8, num_images=2, proprio_dim=7, film=True)


def get_config(variant: str = "lora"):
    if variant not in VARIANTS:
        raise ValueError(f"finetune_own variant {variant!r}: use one of {VARIANTS}")
    if variant == "tiny":
        return _tiny()
    c = base_config("7b" if variant == "lora" else "7b-oft-libero")
    c.data.mixture = ""  # the dataset of --dataset-spec
    c.num_steps = 20_000
    c.save_every = 2_000
    c.eval_every = 1_000
    c.eval_batches = 8
    c.remat = "dots"
    c.scan_layers = True
    c.mode = "lora"
    c.lora.rank, c.lora.dropout = 32, 0.0  # alpha: min(rank, 16) = 16, as upstream
    c.optimizer.lr = 5e-4
    if variant == "oft":
        c.model.film = True
        c.model.proprio_dim = 7
        c.max_length = 96 + 8 * 7 + 1  # the prompt + 56 action slots + the stop token
        c.batch_size = 64
    else:
        c.batch_size = 16
    return c


def _tiny():
    c = base_config("tiny")
    for key, value in TINY_OFT.items():
        c.model[key] = value
    c.model.image_size = 56
    c.param_init = "fan_in"  # tiny widths train from scratch far better with LeCun-scaled init (see the demo)
    c.tokenizer = "char"  # any instruction, no tokenizer files
    c.max_length = 160  # ~90 characters of prompt + 8 x 7 action slots + the stop token
    c.dtype = "float32"
    c.data.mixture = ""
    c.data.augment = False
    c.data.shuffle_buffer = 2_000
    c.data.threads = 2
    c.batch_size = 8
    c.num_steps = 200
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 2
    c.save_every = 100
    c.keep = 2
    c.mode = "full"
    c.optimizer.lr = 1e-3
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    return c
