"""The official OpenVLA ``config.json`` <-> ``OpenVLAConfig``.

Reads every field with the defaults the official code would apply (the published ``text_config`` is
only {model_type, pad_token_id, torch_dtype, vocab_size}; the rest are transformers ``LlamaConfig``
defaults, RMSNorm eps 1e-6 included) and writes it back the same way, so a round trip reproduces the
file. Unknown top-level fields are carried through unchanged.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.models.config import (LLAMA_BACKBONES, OFT_FIELDS, VISION_BACKBONES, LlamaConfig, OpenVLAConfig,
                                    ViTConfig, openvla_config, vision_towers)

# Official ids -> timm / HF hub ids, as written by the official Prismatic config.
VISION_TIMM_IDS = {
    "dinosiglip-vit-so-224px": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "dinosiglip-vit-so-384px": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_384"],
    "siglip-vit-so400m": ["vit_so400m_patch14_siglip_224"],
    "siglip-vit-so400m-384px": ["vit_so400m_patch14_siglip_384"],
    "dinov2-vit-l": ["vit_large_patch14_reg4_dinov2.lvd142m"],
}
LLM_HF_IDS = {
    "llama2-7b-pure": "meta-llama/Llama-2-7b-hf", "llama2-13b-pure": "meta-llama/Llama-2-13b-hf",
    "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf", "llama2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "vicuna-v15-7b": "lmsys/vicuna-7b-v1.5", "vicuna-v15-13b": "lmsys/vicuna-13b-v1.5",
}
AUTO_MAP_LOCAL = {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                  "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"}
OFFICIAL_REPO = "openvla/openvla-7b"
OFT_KEY = "ovla_jax_oft"  # config.json key holding an OFT model's settings (action head, chunk, images, ...)
# config.json key holding, per tower, the ViT fields that differ from what vision_backbone_id names (a
# tiny tower widened for an experiment, say): without it such a checkpoint could not be rebuilt.
VISION_KEY = "ovla_jax_vision"
REMOTE_CODE_FILES = ("configuration_prismatic.py", "modeling_prismatic.py")

# transformers LlamaConfig field -> (our LlamaConfig field, default). Defaults are transformers'.
_TEXT_FIELDS = {
    "vocab_size": ("vocab_size", 32000),
    "hidden_size": ("hidden_size", 4096),
    "intermediate_size": ("intermediate_size", 11008),
    "num_hidden_layers": ("num_layers", 32),
    "num_attention_heads": ("num_heads", 32),
    "num_key_value_heads": ("num_kv_heads", None),
    "head_dim": ("head_dim", None),
    "rms_norm_eps": ("rms_norm_eps", 1e-6),
    "rope_theta": ("rope_theta", 10000.0),
    "max_position_embeddings": ("max_position_embeddings", 2048),
}
# Fields that would change the math; only their defaults are supported.
_TEXT_UNSUPPORTED = {"rope_scaling": None, "attention_bias": False, "mlp_bias": False,
                     "tie_word_embeddings": False, "hidden_act": "silu"}


def _fail(path: str, message: str):
    raise CheckpointError(f"{path}: {message}")


def config_from_hf(raw: dict, path: str = "config.json") -> tuple[OpenVLAConfig, dict]:
    """Parse a loaded official config.json -> (OpenVLAConfig, norm_stats)."""
    if raw.get("model_type", "openvla") not in ("openvla", "prismatic"):
        _fail(path, f"model_type {raw.get('model_type')!r} is not an OpenVLA/Prismatic checkpoint")
    vision_id = raw.get("vision_backbone_id", "siglip-vit-so400m")
    if vision_id not in VISION_BACKBONES:
        _fail(path, f"unsupported vision_backbone_id {vision_id!r}; supported: {sorted(VISION_BACKBONES)}")
    llm_id = raw.get("llm_backbone_id", "vicuna-v15-7b")
    if llm_id not in LLAMA_BACKBONES:
        _fail(path, f"unsupported llm_backbone_id {llm_id!r} (only Llama-family backbones); supported: "
                    f"{list(LLAMA_BACKBONES)}")
    overrides = [a for a in raw.get("timm_override_act_layers") or [] if a is not None]
    if overrides:
        _fail(path, f"unsupported timm_override_act_layers {overrides} (only the default exact GELU)")
    sizes = raw.get("image_sizes") or [VISION_BACKBONES[vision_id][1]]
    if len(set(sizes)) != 1:
        _fail(path, f"image_sizes {sizes}: towers of different resolutions are not supported")
    arch = raw.get("arch_specifier", "gelu-mlp")
    if arch.endswith("fused-gelu-mlp"):
        projector = "fused-gelu-mlp"
    elif arch.endswith("gelu-mlp"):
        projector = "gelu-mlp"
    else:
        _fail(path, f"unsupported arch_specifier {arch!r} (expected '...gelu-mlp' or '...fused-gelu-mlp')")
    towers = len(VISION_BACKBONES[vision_id][0])
    if (projector == "fused-gelu-mlp") != (towers == 2):
        _fail(path, f"arch_specifier {arch!r} does not fit vision backbone {vision_id!r} ({towers} tower(s))")

    text = dict(raw.get("text_config") or {})
    if text.get("model_type", "llama") != "llama":
        _fail(path, f"text_config.model_type {text.get('model_type')!r} is not supported (llama only)")
    for field, default in _TEXT_UNSUPPORTED.items():
        if text.get(field, default) != default:
            _fail(path, f"text_config.{field}={text[field]!r} is not supported (only {default!r})")
    llm = LlamaConfig(**{ours: text.get(theirs, default) for theirs, (ours, default) in _TEXT_FIELDS.items()})

    passthrough = {k: v for k, v in raw.items() if k not in ("norm_stats", OFT_KEY, VISION_KEY)}
    oft = raw.get(OFT_KEY) or {}
    unknown = sorted(set(oft) - set(OFT_FIELDS))
    if unknown:
        _fail(path, f"{OFT_KEY}: unknown field(s) {unknown}; known: {list(OFT_FIELDS)}")
    try:
        config = openvla_config(
            vision_backbone_id=vision_id, llm=llm, image_size=sizes[0], projector=projector,
            pad_token_id=raw.get("pad_token_id", 32000), pad_to_multiple_of=raw.get("pad_to_multiple_of", 64),
            n_action_bins=raw.get("n_action_bins", 256), hf=json.dumps(passthrough, sort_keys=True), **oft)
    except ValueError as e:
        _fail(path, str(e))
    if raw.get(VISION_KEY):
        config = dataclasses.replace(config, vision=_towers_with(config.vision, raw[VISION_KEY], path))
    return config, raw.get("norm_stats") or {}


def _towers_with(towers: tuple, changes, path: str) -> tuple:
    """The named backbone's towers with each one's recorded field changes applied."""
    known = {f.name for f in dataclasses.fields(ViTConfig)} - {"image_size"}
    if not isinstance(changes, list) or len(changes) != len(towers) or not all(isinstance(c, dict) for c in changes):
        _fail(path, f"{VISION_KEY} must be a list of {len(towers)} dicts (one per tower), got {changes!r}")
    for c in changes:
        unknown = sorted(set(c) - known)
        if unknown:
            _fail(path, f"{VISION_KEY}: unknown ViT field(s) {unknown}; known: {sorted(known)}")
    return tuple(dataclasses.replace(t, **c) for t, c in zip(towers, changes))


def tower_changes(config: OpenVLAConfig, vision_id: str) -> list:
    """Per tower, the ViT fields that differ from the towers ``vision_id`` names at the same size."""
    named = vision_towers(vision_id, config.vision[0].image_size)
    return [{f.name: getattr(t, f.name) for f in dataclasses.fields(ViTConfig)
             if getattr(t, f.name) != getattr(n, f.name)} for t, n in zip(config.vision, named)]


def text_config_to_hf(llm: LlamaConfig, pad_token_id: int, torch_dtype: str) -> dict:
    """Only fields that differ from transformers' defaults, plus the four the official file always has."""
    text = {"model_type": "llama", "pad_token_id": pad_token_id, "torch_dtype": torch_dtype,
            "vocab_size": llm.vocab_size}
    for theirs, (ours, default) in _TEXT_FIELDS.items():
        value = getattr(llm, ours)
        if theirs != "vocab_size" and value != default:
            text[theirs] = value
    return text


RUN_KEY = "ovla_jax_run"  # config.json entry: how the run normalized actions, its prompt length and tokenizer


def config_to_hf(config: OpenVLAConfig, norm_stats: Optional[dict], torch_dtype: str,
                 has_remote_code: bool, run: Optional[dict] = None) -> dict:
    """OpenVLAConfig -> official config.json dict (loads with trust_remote_code). ``run``: the training
    run's settings a loader needs to use the weights as trained (normalization, max_length, tokenizer);
    an extra key that HF's loaders ignore."""
    known = config.hf_fields
    vision_id = known.get("vision_backbone_id")
    if vision_id is None:
        raise CheckpointError("the model config carries no vision_backbone_id; build it with openvla_config()")
    llm_id = known.get("llm_backbone_id", "llama2-7b-pure")
    size = config.vision[0].image_size
    out: dict[str, Any] = dict(known)
    out.update({
        "arch_specifier": known.get("arch_specifier", "no-align+" + config.projector),
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": dict(AUTO_MAP_LOCAL) if has_remote_code else
        {k: f"{OFFICIAL_REPO}--{v}" for k, v in AUTO_MAP_LOCAL.items()},
        "hf_llm_id": LLM_HF_IDS.get(llm_id, known.get("hf_llm_id")),
        "image_resize_strategy": known.get("image_resize_strategy", "resize-naive"),
        "image_sizes": [size] * len(config.vision),
        "llm_backbone_id": llm_id,
        "llm_max_length": known.get("llm_max_length", 2048),
        "model_type": "openvla",
        "n_action_bins": config.n_action_bins,
        "norm_stats": norm_stats or {},
        "output_projector_states": known.get("output_projector_states", False),
        "pad_to_multiple_of": config.pad_to_multiple_of,
        "pad_token_id": config.pad_token_id,
        "text_config": text_config_to_hf(config.llm, config.pad_token_id, torch_dtype),
        "timm_model_ids": VISION_TIMM_IDS.get(vision_id, known.get("timm_model_ids")),
        "timm_override_act_layers": [None] * len(config.vision),
        "torch_dtype": torch_dtype,
        "transformers_version": known.get("transformers_version", "4.40.1"),
        "use_fused_vision_backbone": len(config.vision) > 1,
        "vision_backbone_id": vision_id,
    })
    defaults = OpenVLAConfig.__dataclass_fields__
    oft = {k: v for k, v in config.oft_fields.items() if v != defaults[k].default}
    if oft:  # an OFT model: its settings ride along (transformers ignores unknown keys)
        out[OFT_KEY] = oft
    changes = tower_changes(config, vision_id)
    if any(changes):
        out[VISION_KEY] = changes
    # Keep key order stable and identical to transformers' sorted output.
    if run:
        out[RUN_KEY] = {k: v for k, v in run.items() if v is not None}
    return {k: out[k] for k in sorted(out)}
