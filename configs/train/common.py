"""Defaults every training config starts from (``ovla-jax train --config configs/train/<name>.py``).

Override any field on the command line: ``--config.batch_size=64 --config.optimizer.lr=1e-4``.
"""
import os

import ml_collections
from ml_collections import config_dict

from configs.model import openvla as model_configs


def base_config(model: str = "7b") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = model_configs.get_config(model).unlock()
    c.init_checkpoint = ""  # converted checkpoint dir (HF or ovla-jax); its config.json replaces `model`
    c.tokenizer = "char"  # "char" (built-in tiny) or a local HF tokenizer dir (e.g. the openvla-7b download)
    c.param_init = "hf"  # hf: normal(0.02) as the official configs | fan_in: for small models trained from scratch
    c.max_length = 96  # tokens per example (prompt + 7 action tokens + EOS), right-padded

    # mixture: a named mixture, a dataset, or "" = the one dataset of dataset_specs. dataset_specs: your own
    # datasets declared in YAML / JSON files (or dicts; see ovla_jax/data/spec_file.py; ovla-jax train
    # --dataset-spec FILE adds one). normalization: auto = what the specs declare, else bounds_q99.
    c.data = ml_collections.ConfigDict(dict(
        data_dir="", mixture="bridge", augment=True, shuffle_buffer=256_000, threads=16, window=1,
        skip_unlabeled=True, normalization="auto", dataset_specs=(),
        stats_cache_dir=os.path.join(os.path.expanduser("~"), ".cache", "ovla_jax", "stats")))
    c.eval_split = "val"

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.batch_size = 16  # global, over all processes
    c.num_steps = 1000
    c.seed = 0
    c.dtype = "bfloat16"  # compute dtype; params, logits and loss stay float32
    c.remat = "none"  # none | dots | dots_all | full (see ovla_jax/models/remat.py)
    c.scan_layers = False  # nn.scan over each tower's blocks and the LLM's layers (fast compiles; ovla_jax/models/scan.py)

    c.mode = "full"  # full | frozen_vision | last_layer | sandwich | lora
    # rank > 0 adds adapters; alpha None = upstream's min(rank, 16) (scale alpha / rank = 1 up to rank 16)
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=config_dict.placeholder(float), dropout=0.0))
    # How frozen params are stored (modes that freeze: lora, frozen_vision, last_layer, sandwich; see
    # ovla_jax/train/frozen.py). frozen_dtype: auto = the compute dtype (bf16 base under bf16 compute, as
    # upstream's LoRA) | float32 | bfloat16. frozen_quantize: none | int8 | int4 (QLoRA-style: the frozen
    # Dense kernels of init_checkpoint quantized as they are read, dequantized one layer at a time in the
    # step; export merges the adapters into init_checkpoint's original weights).
    c.frozen_dtype = "auto"
    c.frozen_quantize = "none"
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=2e-5, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=1.0, accumulate_steps=1))

    c.log_every = 10
    c.eval_every = 0  # 0 = no validation
    c.eval_batches = 8
    c.save_every = 1000
    c.keep = 3
    c.async_checkpoints = True
    c.wandb_project = ""  # set (with wandb installed) to log to W&B as well
    return c
