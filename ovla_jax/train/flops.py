"""Model FLOPs of one training example, counted analytically from the parameter tree.

MFU divides these by the hardware's peak. They are the FLOPs the model needs, not the ones a program
spends: rematerialization is not counted (that would be HFU), padding tokens are (the sequence is
fixed-length). The count walks the per-layer params of the model (adapters included), so it follows
any config, and which weights get gradients comes from the fine-tuning mode's own patterns.

    forward      = 2 * sum(weights x tokens) over every matmul that runs + 4 * T^2 * width per attention
    input grads  = forward of every component (vision, projector, LLM) with something trainable in it or
                   before it (the gradient has to flow back through it); its attention products count
                   twice (both operands of QK^T and of AV need gradients, and they hold no weights)
    weight grads = 2 * sum(trainable weights x tokens)
    train        = forward + input grads + weight grads        (full training: 3 x forward = "6 N T")

Tokens: a vision tower's patches + prefix tokens, through its blocks up to the feature block only (the
rest never runs); projector: patches; LLM: patches + text length; LM head: the labelled positions.
"""
from __future__ import annotations

import dataclasses
import re

from flax import traverse_util

from ovla_jax.models.config import OpenVLAConfig
from ovla_jax.models.openvla import OpenVLA

COMPONENTS = ("vision_backbone", "projector", "language_model")
FORMULA = ("train = fwd + input-grads + weight-grads; fwd = 2*sum(weights*tokens) + 4*T^2*width per attention "
           "layer; input-grads = fwd of each component (vision, projector, LLM) with anything trainable at or "
           "before it, attention twice; weight-grads = 2*sum(trainable weights*tokens); full training = 3*fwd (6NT); remat "
           "recompute not counted")
_BLOCK = re.compile(r"^blocks_(\d+)$")


@dataclasses.dataclass(frozen=True)
class ExampleFlops:
    forward: float
    input_grads: float
    weight_grads: float
    by_component: dict  # component -> forward FLOPs

    @property
    def train(self) -> float:
        return self.forward + self.input_grads + self.weight_grads


def _tokens(path: tuple, config: OpenVLAConfig, text_len: int, num_labels: int) -> int:
    """How many positions a weight at ``path`` is applied to in one example (0: never runs)."""
    if path[0] == "vision_backbone":
        tower = config.vision[("featurizer", "fused_featurizer").index(path[1])]
        part = path[2]
        if part == "patch_embed":
            return tower.num_patches
        match = _BLOCK.match(part)
        if match is None:  # the final norm and SigLIP's attention-pool head: unused by OpenVLA
            return 0
        return tower.num_patches + tower.num_prefix_tokens if int(match.group(1)) <= tower.feature_block else 0
    if path[0] == "projector":
        return config.num_patches
    if path[:2] == ("language_model", "lm_head"):
        return num_labels
    return config.num_patches + text_len


def _attention(config: OpenVLAConfig, text_len: int) -> dict:
    """Forward FLOPs of the attention products (QK^T and AV, full T x T) per component."""
    vision = sum(4 * (t.num_patches + t.num_prefix_tokens) ** 2 * t.width * (t.feature_block + 1)
                 for t in config.vision)
    llm = config.llm
    seq = config.num_patches + text_len
    return {"vision_backbone": float(vision), "projector": 0.0,
            "language_model": float(4 * seq ** 2 * llm.num_heads * llm.dim_per_head * llm.num_layers)}


def example_flops(config: OpenVLAConfig, text_len: int, trainable, lora=None, num_labels: int = 8) -> ExampleFlops:
    """FLOPs of one training example. ``trainable`` is a predicate on "/"-joined param paths (the
    fine-tuning mode's patterns); ``lora`` adds the adapters' matmuls."""
    from ovla_jax.checkpoints.hf import abstract_params  # the per-layer tree, whatever the run's scan flag

    params = abstract_params(config) if lora is None else _abstract_with_lora(config, lora)
    forward = dict.fromkeys(COMPONENTS, 0.0)
    weight_grads, has_trainable = 0.0, dict.fromkeys(COMPONENTS, False)
    for path, leaf in traverse_util.flatten_dict(params).items():
        is_matmul = (path[-1] in ("kernel", "lora_a", "lora_b") and len(leaf.shape) >= 2)
        train = trainable("/".join(path))
        has_trainable[path[0]] |= train
        if not is_matmul:
            continue
        tokens = _tokens(path, config, text_len, num_labels)
        weights = 1
        for d in leaf.shape:
            weights *= d
        forward[path[0]] += 2.0 * weights * tokens
        if train:
            weight_grads += 2.0 * weights * tokens
    attention = _attention(config, text_len)
    for component, flops in attention.items():
        forward[component] += flops
    input_grads, upstream = 0.0, False
    for component in COMPONENTS:  # data flows vision -> projector -> LLM
        upstream |= has_trainable[component]
        if upstream:
            input_grads += forward[component] + attention[component]
    return ExampleFlops(sum(forward.values()), input_grads, weight_grads, forward)


def _abstract_with_lora(config: OpenVLAConfig, lora):
    import jax
    import jax.numpy as jnp
    from flax.linen import meta

    model = OpenVLA(config, lora=lora)
    size = config.vision[0].image_size
    pixels = jnp.zeros((1, size, size, 3 * len(config.vision)), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), pixels, jnp.zeros((1, 2), jnp.int32)))
    return meta.unbox(variables["params"])
