"""Numerical parity with a PyTorch reference assembled from timm ViTs + a transformers Llama + the
projector, run with the official OpenVLA forward semantics (second-to-last block features, patches
after BOS, 6-channel NCHW pixels). Random non-trivial weights go HF names -> our converter -> JAX."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax.numpy as jnp  # noqa: E402

from ovla_jax.checkpoints import hf  # noqa: E402
from ovla_jax.models.openvla import OpenVLA, greedy_decode  # noqa: E402

pytestmark = pytest.mark.torch

IMAGE = 28
VOCAB = 384


class TorchProjector(torch.nn.Module):
    """The official fused projector: fc1 (V -> 4V), GELU, fc2 (4V -> L), GELU, fc3 (L -> L)."""

    def __init__(self, vision_dim, llm_dim):
        super().__init__()
        self.fc1 = torch.nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = torch.nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = torch.nn.Linear(llm_dim, llm_dim)
        self.act = torch.nn.GELU()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class TorchOpenVLA(torch.nn.Module):
    def __init__(self, kv_heads=None):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        # Same flags as vit_large_patch14_reg4_dinov2 / vit_so400m_patch14_siglip_224, tiny widths.
        self.dino = VisionTransformer(img_size=IMAGE, patch_size=14, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2,
                                      init_values=1e-5, reg_tokens=4, no_embed_class=True, num_classes=0)
        self.siglip = VisionTransformer(img_size=IMAGE, patch_size=14, embed_dim=48, depth=3, num_heads=4, mlp_ratio=2,
                                        class_token=False, global_pool="map", num_classes=0)
        self.projector = TorchProjector(80, 64)
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=kv_heads or 4,
                                       pad_token_id=VOCAB - 64, rms_norm_eps=1e-6)
        self.llm = transformers.LlamaForCausalLM(cfg)

    def features(self, tower, images):
        return tower.get_intermediate_layers(images, n=[len(tower.blocks) - 2])[0]

    def forward(self, pixel_values, input_ids, attention_mask):
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        patches = self.projector(torch.cat([self.features(self.dino, img), self.features(self.siglip, img_fused)], dim=2))
        text = self.llm.get_input_embeddings()(input_ids)
        embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
        ones = torch.ones(patches.shape[:2], dtype=attention_mask.dtype)
        mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        return self.llm(inputs_embeds=embeds, attention_mask=mask).logits

    def hf_state_dict(self):
        """Official HF names (LayerScale gamma is stored as scale_factor)."""
        out = {}
        for prefix, module in (("vision_backbone.featurizer.", self.dino), ("vision_backbone.fused_featurizer.", self.siglip),
                               ("projector.", self.projector), ("language_model.", self.llm)):
            for k, v in module.state_dict().items():
                out[prefix + k.replace(".gamma", ".scale_factor")] = v.detach().clone().contiguous()
        return out


def hf_config_json(kv_heads=None):
    config = {
        "arch_specifier": "no-align+fused-gelu-mlp", "vision_backbone_id": "dinosiglip-vit-tiny",
        "llm_backbone_id": "llama2-tiny", "image_sizes": [IMAGE, IMAGE], "model_type": "openvla",
        "pad_token_id": VOCAB - 64, "pad_to_multiple_of": 64, "n_action_bins": 256, "use_fused_vision_backbone": True,
        "text_config": {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "pad_token_id": VOCAB - 64,
                        "torch_dtype": "float32"},
        "norm_stats": {"toy": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}},
    }
    if kv_heads:
        config["text_config"]["num_key_value_heads"] = kv_heads
    return config


@pytest.fixture(scope="module", params=[None, 2], ids=["mha", "gqa"])
def reference(request, tmp_path_factory):
    """Parametrized over the LLM's attention: plain multi-head, and grouped-query (2 kv heads for 4)."""
    torch.manual_seed(0)
    kv_heads = request.param
    model = TorchOpenVLA(kv_heads).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random non-trivial weights: no zero biases, no unit LayerScale / norms
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.2) + (1.0 if "norm" in name and "weight" in name else 0.0))
    path = tmp_path_factory.mktemp("hf") / "tiny-openvla"
    os.makedirs(path)
    state = model.hf_state_dict()
    keys = sorted(state)
    safetensors_torch.save_file({k: state[k] for k in keys[: len(keys) // 2]}, str(path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    safetensors_torch.save_file({k: state[k] for k in keys[len(keys) // 2:]}, str(path / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= len(keys) // 2)}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(hf_config_json(kv_heads)))
    config, params, norm_stats = hf.load_hf_checkpoint(str(path))
    assert config.llm.kv_heads == (kv_heads or 4)
    return model, config, params, norm_stats, state


def _inputs(batch_lengths, seed=3):
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-2, 2, (len(batch_lengths), 6, IMAGE, IMAGE)).astype(np.float32)
    ids = [[1] + list(rng.integers(3, VOCAB - 64, n - 1)) for n in batch_lengths]
    return pixels, ids


def _pad_right(rows, dtype):
    """Right-pad id lists with the pad token -> (ids, mask)."""
    width = max(map(len, rows))
    ids = np.full((len(rows), width), VOCAB - 64, dtype)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = True
    return ids, mask


def _jax_logits(config, params, pixels_nchw, ids, mask):
    model = OpenVLA(config)
    return np.asarray(model.apply({"params": params}, jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)),
                                  jnp.asarray(ids), jnp.asarray(mask)))


def test_loaded_tensors_match_torch_state(reference):
    model, config, params, norm_stats, state = reference
    assert norm_stats["toy"]["action"]["mask"][-1] is False
    for entry in hf.name_map(config):
        leaf = params
        for p in entry.path:
            leaf = leaf[p]
        np.testing.assert_array_equal(entry.to_hf(leaf), state[entry.hf_name].numpy(), err_msg=entry.hf_name)


def test_logits_match_torch_unpadded(reference):
    model, config, params, _, _ = reference
    pixels, ids = _inputs([9])
    ids = np.array(ids)
    with torch.no_grad():
        want = model(torch.from_numpy(pixels), torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.long)).numpy()
    got = _jax_logits(config, params, pixels, ids, np.ones(ids.shape, bool))
    assert got.shape == want.shape == (1, 9 + 4, VOCAB)
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    assert np.abs(want).max() > 1.0  # the comparison is not between near-zero tensors


def test_logits_match_torch_padded_batch(reference):
    model, config, params, _, _ = reference
    lengths = [6, 11, 8]
    pixels, ids = _inputs(lengths, seed=4)
    padded, mask = _pad_right(ids, np.int64)
    got = _jax_logits(config, params, pixels, padded, mask)
    patches = config.num_patches
    for i, row in enumerate(ids):
        with torch.no_grad():
            want = model(torch.from_numpy(pixels[i:i + 1]), torch.tensor([row]), torch.ones((1, len(row)), dtype=torch.long)).numpy()[0]
        valid = got[i, :len(row) + patches]
        assert np.abs(valid - want).max() <= 1e-4, (i, np.abs(valid - want).max())


def _torch_greedy(model, pixels, row, n):
    row = list(row)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.from_numpy(pixels), torch.tensor([row]), torch.ones((1, len(row)), dtype=torch.long))
        token = int(logits[0, -1].argmax())
        out.append(token)
        row.append(token)
    return out


def test_greedy_action_tokens_match_torch_with_padded_batch(reference):
    model, config, params, _, _ = reference
    lengths = [7, 12, 9]
    pixels, ids = _inputs(lengths, seed=5)
    want = [_torch_greedy(model, pixels[i:i + 1], row, 7) for i, row in enumerate(ids)]
    padded, mask = _pad_right(ids, np.int32)
    tokens, _ = greedy_decode(OpenVLA(config), params, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(padded),
                              jnp.asarray(mask), num_tokens=7)
    assert np.asarray(tokens).tolist() == want
    assert len({tuple(w) for w in want}) > 1  # rows differ: padding did not collapse them


def test_our_export_reads_back_with_the_safetensors_library(reference, tmp_path):
    """Files written by our streaming writer load with safetensors' own torch reader, equal to the source."""
    model, config, params, norm_stats, state = reference
    hf.save_hf_checkpoint(str(tmp_path / "out"), config, params, norm_stats, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    loaded = {}
    for file in sorted(set(index["weight_map"].values())):
        loaded.update(safetensors_torch.load_file(str(tmp_path / "out" / file)))
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
