"""Architecture configs: frozen dataclasses, built by name from small tables (variants by name).

These are what the Flax modules take. ``configs/model/*.py`` select them by name; the HF checkpoint
converter builds them from an official ``config.json`` (``checkpoints/hf_config.py``).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """One ViT tower. DINOv2 and SigLIP differ only by the flags below."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 14
    image_size: int = 224
    class_token: bool = False
    num_registers: int = 0
    layerscale: bool = False
    layerscale_init: float = 1e-5  # DINOv2's init_values; tiny models trained from scratch use larger
    pool: str = "token"  # "token" (cls token; no params) or "map" (attention-pool head params)
    feature_layer: int = -2  # block whose output is the feature (python index: -2 = second to last)
    norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_registers

    @property
    def feature_block(self) -> int:
        """Non-negative index of the block whose output is returned as features."""
        index = self.feature_layer % self.depth
        return index


# name -> (width, depth, heads, mlp, flags); image size is set separately.
_VIT_FAMILIES = {
    "dinov2-reg4": dict(class_token=True, num_registers=4, layerscale=True, pool="token"),
    "siglip": dict(class_token=False, num_registers=0, layerscale=False, pool="map"),
}
_VIT_SIZES = {
    "L/14": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=14),
    "So400m/14": dict(width=1152, depth=27, num_heads=16, mlp_dim=4304, patch_size=14),
    # Tiny towers for tests and the demo: the same code paths, milliseconds to run.
    "tiny/14": dict(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=14),
    "tiny48/14": dict(width=48, depth=3, num_heads=4, mlp_dim=96, patch_size=14),
}


def vit_config(name: str, image_size: int = 224, **overrides: Any) -> ViTConfig:
    """Decode ``"<family>-<size>"`` (e.g. ``"dinov2-reg4-L/14"``, ``"siglip-So400m/14"``)."""
    for family, flags in _VIT_FAMILIES.items():
        prefix = family + "-"
        if name.startswith(prefix) and name[len(prefix):] in _VIT_SIZES:
            fields = {**flags, **_VIT_SIZES[name[len(prefix):]], "image_size": image_size, **overrides}
            return ViTConfig(**fields)
    families = ", ".join(_VIT_FAMILIES)
    sizes = ", ".join(_VIT_SIZES)
    raise ValueError(f"unknown ViT variant {name!r}: expected '<family>-<size>' with family in ({families}) "
                     f"and size in ({sizes})")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama decoder. Defaults are transformers' ``LlamaConfig`` defaults (eps 1e-6 included)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None  # None = num_heads (no GQA)
    head_dim: Optional[int] = None  # None = hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class OpenVLAConfig:
    """The whole policy: vision towers (1 or 2, fused on the feature axis), projector, LLM.

    ``hf`` keeps the official ``config.json`` identity fields (backbone ids, arch specifier, ...) so
    a converted checkpoint writes them back unchanged.
    """

    vision: tuple[ViTConfig, ...]
    llm: LlamaConfig
    projector: str = "fused-gelu-mlp"  # "fused-gelu-mlp" (3 layers) or "gelu-mlp" (2 layers)
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    hf: str = "{}"  # JSON of config.json identity fields (hashable; see checkpoints/hf_config.py)
    # OpenVLA-OFT (see ``ovla_jax/models/heads.py``); the defaults are the original OpenVLA.
    action_head: str = "tokens"  # "tokens" | "parallel-tokens" | "l1"
    chunk: int = 1  # K actions per prediction (parallel heads only)
    action_dim: int = 7  # D numbers per action
    num_images: int = 1  # cameras, each through every tower, patches concatenated (third-person first)
    proprio_dim: int = 0  # 0 = no proprio token; else one token from a P-dim normalized state
    film: bool = False  # FiLM every ViT block with the mean language embedding (OFT+)
    head_hidden: int = 0  # L1 head width; 0 = the LLM width (as OFT)

    def __post_init__(self):
        if not self.vision:
            raise ValueError("OpenVLAConfig needs at least one vision tower")
        patches = {v.num_patches for v in self.vision}
        if len(patches) != 1:
            raise ValueError(f"fused vision towers must yield the same number of patches, got {patches}")
        if self.projector not in ("fused-gelu-mlp", "gelu-mlp"):
            raise ValueError(f"unknown projector {self.projector!r}")
        if self.action_head not in ACTION_HEADS:
            raise ValueError(f"unknown action_head {self.action_head!r}; choose from {ACTION_HEADS}")
        if self.action_head == "tokens" and self.chunk != 1:
            raise ValueError(f"action_head 'tokens' decodes one action (chunk 1), got chunk {self.chunk}; "
                             f"chunks need action_head 'parallel-tokens' or 'l1'")
        for name in ("chunk", "action_dim", "num_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.proprio_dim < 0:
            raise ValueError(f"proprio_dim must be >= 0, got {self.proprio_dim}")

    @property
    def parallel(self) -> bool:
        """OFT's parallel decoding: action slots after the prompt, bidirectional attention, one pass."""
        return self.action_head != "tokens"

    @property
    def num_action_slots(self) -> int:
        return self.chunk * self.action_dim if self.parallel else 0

    @property
    def num_prefix_embeddings(self) -> int:
        """Embeddings inserted after BOS: every image's patches, then the proprio token if any."""
        return self.num_images * self.num_patches + (1 if self.proprio_dim else 0)

    @property
    def oft_fields(self) -> dict:
        """The OFT settings (what a plain OpenVLA config.json lacks), for checkpoints and metadata."""
        return {k: getattr(self, k) for k in OFT_FIELDS}

    @property
    def hf_fields(self) -> dict:
        return json.loads(self.hf)

    @property
    def vision_dim(self) -> int:
        return sum(v.width for v in self.vision)

    @property
    def num_patches(self) -> int:
        return self.vision[0].num_patches

    @property
    def tokenizer_vocab_size(self) -> int:
        """Vocabulary of the tokenizer: the embedding rows minus the pad-to-multiple padding.

        Action tokens are the last ``n_action_bins`` ids below it (32000 for OpenVLA-7B).
        """
        return self.llm.vocab_size - self.pad_to_multiple_of


ACTION_HEADS = ("tokens", "parallel-tokens", "l1")
OFT_FIELDS = ("action_head", "chunk", "action_dim", "num_images", "proprio_dim", "film", "head_hidden")
STOP_TOKEN_ID = 2  # OFT's stop token after the action slots (Llama's EOS)


# Official Prismatic/OpenVLA vision backbone ids -> ViT variants (one per tower, fused in this order),
# plus tiny ids with the same structure for tests and the demo. Image size comes from the config.
VISION_BACKBONES: dict[str, tuple[tuple[str, ...], int]] = {
    "dinosiglip-vit-so-224px": (("dinov2-reg4-L/14", "siglip-So400m/14"), 224),
    "dinosiglip-vit-so-384px": (("dinov2-reg4-L/14", "siglip-So400m/14"), 384),
    "siglip-vit-so400m": (("siglip-So400m/14",), 224),
    "siglip-vit-so400m-384px": (("siglip-So400m/14",), 384),
    "dinov2-vit-l": (("dinov2-reg4-L/14",), 224),
    "dinosiglip-vit-tiny": (("dinov2-reg4-tiny/14", "siglip-tiny48/14"), 28),
    "siglip-vit-tiny": (("siglip-tiny48/14",), 28),
    "dinov2-vit-tiny": (("dinov2-reg4-tiny/14",), 28),
}
# LLM backbone ids whose architecture is a Llama decoder (read from text_config).
LLAMA_BACKBONES = ("llama2-7b-pure", "llama2-13b-pure", "llama2-7b-chat", "llama2-13b-chat",
                   "vicuna-v15-7b", "vicuna-v15-13b", "llama2-tiny")

TINY_LLAMA = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)


def vision_towers(vision_backbone_id: str, image_size: Optional[int] = None,
                  **overrides: Any) -> tuple[ViTConfig, ...]:
    """The ViT configs behind an official vision backbone id."""
    if vision_backbone_id not in VISION_BACKBONES:
        raise ValueError(f"unsupported vision backbone id {vision_backbone_id!r}; supported: "
                         f"{sorted(VISION_BACKBONES)}")
    variants, native_size = VISION_BACKBONES[vision_backbone_id]
    return tuple(vit_config(v, image_size or native_size, **overrides) for v in variants)


def openvla_config(vision_backbone_id: str = "dinosiglip-vit-so-224px", llm: Optional[LlamaConfig] = None,
                   image_size: Optional[int] = None, projector: Optional[str] = None,
                   vision_overrides: Optional[dict] = None, **fields: Any) -> OpenVLAConfig:
    """Build an OpenVLAConfig from backbone ids; defaults give OpenVLA-7B (vocab 32064)."""
    towers = vision_towers(vision_backbone_id, image_size, **(vision_overrides or {}))
    if projector is None:
        projector = "fused-gelu-mlp" if len(towers) > 1 else "gelu-mlp"
    llm = llm or LlamaConfig(vocab_size=32064)
    return OpenVLAConfig(vision=towers, llm=llm, projector=projector, **fields)


def from_config_dict(cfg: Any) -> OpenVLAConfig:
    """Build an OpenVLAConfig from a ``configs/model/openvla.py`` ConfigDict (or plain dict)."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    llm_fields = dict(get("llm"))
    return openvla_config(
        vision_backbone_id=get("vision_backbone_id"), image_size=get("image_size"),
        llm=LlamaConfig(**llm_fields), vision_overrides=dict(get("vision_overrides") or {}),
        pad_token_id=get("pad_token_id", 32000), pad_to_multiple_of=get("pad_to_multiple_of", 64),
        n_action_bins=get("n_action_bins", 256),
        **{k: get(k) for k in OFT_FIELDS if get(k) is not None},
        hf=json.dumps({"vision_backbone_id": get("vision_backbone_id"), "llm_backbone_id": get("llm_backbone_id")}),
    )


def tiny_openvla_config(vision_backbone_id: str = "dinosiglip-vit-tiny", **fields: Any) -> OpenVLAConfig:
    """The tiny OpenVLA of tests, the self-check and benches: tiny towers, TINY_LLAMA, tokenizer vocab 320."""
    fields.setdefault("llm", TINY_LLAMA)
    fields.setdefault("pad_token_id", fields["llm"].vocab_size - 64)
    hf = json.dumps({"vision_backbone_id": vision_backbone_id, "llm_backbone_id": "llama2-tiny"})
    return openvla_config(vision_backbone_id, hf=hf, **fields)


def pixel_normalizations(config: OpenVLAConfig) -> tuple[str, ...]:
    """The per-tower pixel normalization names (``ovla_jax.data.frames.TOWER_NORMS``), from the vision
    backbone id: ``dinosiglip-*`` = DINOv2 then SigLIP, ``siglip-*``, ``dinov2-*``."""
    vid = config.hf_fields.get("vision_backbone_id", "")
    for prefix, towers in (("dinosiglip", ("dinov2", "siglip")), ("siglip", ("siglip",)), ("dinov2", ("dinov2",))):
        if vid.startswith(prefix):
            return towers
    raise ValueError(f"cannot tell the pixel normalization of vision backbone {vid!r}")
