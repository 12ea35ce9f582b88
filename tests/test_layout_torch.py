"""The 7B layout equals what the reference libraries build: timm's DINOv2-reg4 and SigLIP towers
(num_classes=0, img_size=224) and transformers' LlamaForCausalLM (Llama-2-7B, vocab 32064), all on
the meta device (no memory), under the official HF names."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from ovla_jax.checkpoints import hf  # noqa: E402
from ovla_jax.models.config import LlamaConfig, openvla_config  # noqa: E402

pytestmark = pytest.mark.torch


def _timm_shapes(name, prefix, img_size):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size)
    return {prefix + k.replace(".gamma", ".scale_factor"): tuple(v.shape) for k, v in model.state_dict().items()}


def _reference_shapes(vision_timm, img_size, fused_dim, llm_dim=4096):
    shapes = {}
    for i, name in enumerate(vision_timm):
        prefix = ("vision_backbone.featurizer.", "vision_backbone.fused_featurizer.")[i]
        shapes.update(_timm_shapes(name, prefix, img_size))
    if len(vision_timm) == 2:
        dims = [(fused_dim, 4 * fused_dim), (4 * fused_dim, llm_dim), (llm_dim, llm_dim)]
    else:
        dims = [(fused_dim, llm_dim), (llm_dim, llm_dim)]
    for i, (d_in, d_out) in enumerate(dims):
        shapes[f"projector.fc{i + 1}.weight"] = (d_out, d_in)
        shapes[f"projector.fc{i + 1}.bias"] = (d_out,)
    cfg = transformers.LlamaConfig(vocab_size=32064, pad_token_id=32000)  # every other field: defaults = Llama-2-7B
    with torch.device("meta"):
        llm = transformers.LlamaForCausalLM(cfg)
    shapes.update({"language_model." + k: tuple(v.shape) for k, v in llm.state_dict().items()})
    return shapes


@pytest.mark.parametrize("vision_id,timm_ids,img,dim", [
    ("dinosiglip-vit-so-224px", ["vit_large_patch14_reg4_dinov2", "vit_so400m_patch14_siglip_224"], 224, 2176),
    ("siglip-vit-so400m", ["vit_so400m_patch14_siglip_224"], 224, 1152),
    ("dinosiglip-vit-so-384px", ["vit_large_patch14_reg4_dinov2", "vit_so400m_patch14_siglip_384"], 384, 2176),
])
def test_layout_matches_timm_and_transformers(vision_id, timm_ids, img, dim):
    ours = dict(hf.iter_hf_names(openvla_config(vision_id, llm=LlamaConfig(vocab_size=32064))))
    want = _reference_shapes(timm_ids, img, dim)
    assert set(ours) == set(want), (sorted(set(ours) - set(want))[:5], sorted(set(want) - set(ours))[:5])
    mismatched = {k: (ours[k], want[k]) for k in ours if ours[k] != want[k]}
    assert not mismatched
    if vision_id == "dinosiglip-vit-so-224px":
        assert sum(int(np.prod(s)) for s in want.values()) == 7_541_237_184
