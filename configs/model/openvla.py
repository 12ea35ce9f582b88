"""OpenVLA model configs: ``--config configs/model/openvla.py:<variant>``.

Variants: ``7b`` (dinosiglip-224px + Llama-2-7B, the published openvla-7b), ``siglip`` and ``dinov2``
(single-tower 224px), ``dinosiglip-384`` (384px towers), ``tiny`` (tests/demo: tiny towers and LLM,
the same code paths). OpenVLA-OFT on the 7B backbone: ``7b-oft-libero`` (L1 head, chunk 8, third-person
+ wrist camera, 8-D proprio), ``7b-oft-bridge`` (chunk 5, one camera), ``7b-oft-aloha`` (chunk 25 of
14-D bimanual actions, 14-D proprio; train it with ``data.normalization="bounds"`` as OFT does; its
three cameras need a dataset that gives them), ``7b-oft-plus-libero`` (FiLM), ``tiny-oft``. ``ovla_jax.models.config.from_config_dict`` turns one into an OpenVLAConfig.
"""
import ml_collections

VARIANTS = {
    "7b": dict(vision_backbone_id="dinosiglip-vit-so-224px", llm_backbone_id="llama2-7b-pure"),
    "siglip": dict(vision_backbone_id="siglip-vit-so400m", llm_backbone_id="llama2-7b-pure"),
    "dinov2": dict(vision_backbone_id="dinov2-vit-l", llm_backbone_id="llama2-7b-pure"),
    "dinosiglip-384": dict(vision_backbone_id="dinosiglip-vit-so-384px", llm_backbone_id="llama2-7b-pure"),
    "tiny": dict(vision_backbone_id="dinosiglip-vit-tiny", llm_backbone_id="llama2-tiny", image_size=28,
                 llm=dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4),
                 vision_overrides=dict(layerscale_init=0.1)),
}
_OFT_LIBERO = dict(action_head="l1", chunk=8, num_images=2, proprio_dim=8)
OFT_VARIANTS = {  # variant -> (backbone variant, OFT fields)
    "7b-oft-libero": ("7b", _OFT_LIBERO),
    "7b-oft-plus-libero": ("7b", dict(_OFT_LIBERO, film=True)),
    "7b-oft-bridge": ("7b", dict(action_head="l1", chunk=5, num_images=1, proprio_dim=0)),
    "7b-oft-aloha": ("7b", dict(action_head="l1", chunk=25, action_dim=14, num_images=3, proprio_dim=14, film=True)),
    "tiny-oft": ("tiny", dict(_OFT_LIBERO, chunk=2, proprio_dim=3)),
}

LLAMA2_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=None, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048)


def get_config(arg: str = "7b") -> ml_collections.ConfigDict:
    if arg in OFT_VARIANTS:
        backbone, fields = OFT_VARIANTS[arg]
        config = get_config(backbone).unlock()
        config.variant = arg
        for key, value in fields.items():
            config[key] = value
        return config.lock()
    if arg not in VARIANTS:
        raise ValueError(f"unknown model variant {arg!r}; choose from {sorted(VARIANTS) + sorted(OFT_VARIANTS)}")
    variant = dict(VARIANTS[arg])
    config = ml_collections.ConfigDict()
    config.variant = arg
    config.vision_backbone_id = variant["vision_backbone_id"]
    config.llm_backbone_id = variant["llm_backbone_id"]
    config.image_size = ml_collections.FieldReference(variant.get("image_size"), field_type=int)
    config.llm = dict(LLAMA2_7B, **variant.get("llm", {}))
    config.vision_overrides = variant.get("vision_overrides", {})
    config.pad_token_id = config.llm.vocab_size - 64 if arg == "tiny" else 32000
    config.pad_to_multiple_of = 64
    config.n_action_bins = 256
    return config.lock()
