"""The official OpenVLA composition in PyTorch, for timing beside ovla-jax (``bench_train.py --vs-torch``).

As the official code builds it: timm towers created by name (``vit_large_patch14_reg4_dinov2.lvd142m``
and ``vit_so400m_patch14_siglip_224`` at the configured image size, features of the second-to-last
block via ``get_intermediate_layers``), the fused GELU-MLP projector, a transformers
``LlamaForCausalLM`` fed ``inputs_embeds`` = BOS, patches, rest of the prompt, and its own
cross-entropy over the labels (patches labelled -100). bf16 is ``torch.autocast`` over fp32 weights,
as the official training runs it; the optimizer is ``torch.optim.AdamW`` after
``clip_grad_norm_`` (the official max_grad_norm is 1.0). Random weights: speed does not depend on them.
Needs the ``[torch]`` extra.
"""
from __future__ import annotations

import numpy as np


def build(config, seed: int = 0):
    """(model, optimizer) for an :class:`ovla_jax.models.config.OpenVLAConfig` with the fused
    DINOv2 + SigLIP towers (widths and depths taken from the timm models themselves)."""
    import timm
    import torch
    import transformers

    torch.manual_seed(seed)
    size = config.vision[0].image_size
    llm = config.llm

    class Projector(torch.nn.Module):
        def __init__(self, vision_dim: int, llm_dim: int):
            super().__init__()
            self.fc1 = torch.nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = torch.nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = torch.nn.Linear(llm_dim, llm_dim)
            self.act = torch.nn.GELU()

        def forward(self, x):
            return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))

    class OpenVLA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.featurizer = timm.create_model("vit_large_patch14_reg4_dinov2.lvd142m", pretrained=False,
                                                num_classes=0, img_size=size)
            self.fused_featurizer = timm.create_model("vit_so400m_patch14_siglip_224", pretrained=False,
                                                      num_classes=0, img_size=size)
            width = self.featurizer.embed_dim + self.fused_featurizer.embed_dim
            self.projector = Projector(width, llm.hidden_size)
            self.language_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
                num_key_value_heads=llm.kv_heads, rms_norm_eps=llm.rms_norm_eps, pad_token_id=config.pad_token_id))

        @staticmethod
        def _features(tower, images):
            return tower.get_intermediate_layers(images, n={len(tower.blocks) - 2})[0]

        def forward(self, pixel_values, input_ids, attention_mask, labels):
            image, fused = torch.split(pixel_values, [3, 3], dim=1)
            patches = self.projector(torch.cat([self._features(self.featurizer, image),
                                                self._features(self.fused_featurizer, fused)], dim=2))
            text = self.language_model.get_input_embeddings()(input_ids)
            embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
            ones = torch.ones(patches.shape[:2], dtype=attention_mask.dtype)
            mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
            ignore = torch.full(patches.shape[:2], -100, dtype=labels.dtype)
            labels = torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1)
            return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    model = OpenVLA().train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)


def to_torch(batch: dict) -> dict:
    """A host batch of ovla-jax's layout (NHWC pixels, IGNORE = -100 labels) as torch tensors."""
    import torch

    return {"pixel_values": torch.from_numpy(np.ascontiguousarray(batch["pixel_values"].transpose(0, 3, 1, 2))),
            "input_ids": torch.from_numpy(batch["input_ids"].astype(np.int64)),
            "attention_mask": torch.from_numpy(batch["attention_mask"].astype(np.int64)),
            "labels": torch.from_numpy(batch["labels"].astype(np.int64))}


def train_step(model, optimizer, batch: dict, dtype: str) -> float:
    """One full fine-tuning step; returns the loss."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        loss = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """Best observed FLOP/s of an n^3 torch matmul in ``dtype``."""
    import time

    import torch

    kind = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a, b = torch.randn(n, n).to(kind), torch.randn(n, n).to(kind)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
