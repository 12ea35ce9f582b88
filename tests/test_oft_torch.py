"""OFT parity with PyTorch: the L1 head and the proprio projector against torch modules of OFT's
architecture (re-stated here), weights moved through OFT's own file layout (``module.``-prefixed torch
state dicts); the bidirectional parallel pass against a transformers Llama given a padding-only 4-D mask."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ovla_jax.checkpoints import hf  # noqa: E402
from ovla_jax.models.config import tiny_openvla_config  # noqa: E402
from ovla_jax.models.heads import L1ActionHead, ProprioProjector  # noqa: E402
from ovla_jax.models.openvla import OpenVLA, gather_slots  # noqa: E402

pytestmark = pytest.mark.torch
CHUNK, DIMS, WIDTH, PROPRIO = 3, 7, 64, 8


class TorchBlock(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ffn = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim), torch.nn.ReLU())

    def forward(self, x):
        return x + self.ffn(x)


class TorchMLPResNet(torch.nn.Module):
    def __init__(self, num_blocks, input_dim, hidden_dim, output_dim):
        super().__init__()
        self.layer_norm1 = torch.nn.LayerNorm(input_dim)
        self.fc1 = torch.nn.Linear(input_dim, hidden_dim)
        self.relu = torch.nn.ReLU()
        self.mlp_resnet_blocks = torch.nn.ModuleList([TorchBlock(hidden_dim) for _ in range(num_blocks)])
        self.layer_norm2 = torch.nn.LayerNorm(hidden_dim)
        self.fc2 = torch.nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class TorchL1Head(torch.nn.Module):
    """OFT's L1RegressionActionHead: slot states [B, K * D, H] -> [B, K, D] via per-step concatenation."""

    def __init__(self, hidden, action_dim, chunk):
        super().__init__()
        self.chunk = chunk
        self.model = TorchMLPResNet(2, hidden * action_dim, hidden, action_dim)

    def forward(self, states):
        return self.model(states.reshape(states.shape[0], self.chunk, -1))


class TorchProprio(torch.nn.Module):
    def __init__(self, llm_dim, proprio_dim):
        super().__init__()
        self.fc1 = torch.nn.Linear(proprio_dim, llm_dim)
        self.fc2 = torch.nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = torch.nn.GELU()

    def forward(self, x):
        return self.fc2(self.act_fn1(self.fc1(x)))


def _randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "layer_norm" in name and "weight" in name else 0.0))


def test_head_and_proprio_projector_match_torch_through_ofts_files(tmp_path):
    config = dataclasses.replace(tiny_openvla_config(), action_head="l1", chunk=CHUNK, num_images=2, proprio_dim=PROPRIO)
    head, proprio = TorchL1Head(WIDTH, DIMS, CHUNK).eval(), TorchProprio(WIDTH, PROPRIO).eval()
    _randomize(head, 1)
    _randomize(proprio, 2)
    # An OFT checkpoint dir: our backbone export, then OFT's torch files (DDP-prefixed) in place of ours.
    rng = np.random.default_rng(0)
    import jax

    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), hf.abstract_params(config))
    path = tmp_path / "oft"
    hf.save_hf_checkpoint(str(path), config, params)
    for f in path.iterdir():
        if "--" in f.name:
            f.unlink()
    torch.save({"module." + k: v for k, v in head.state_dict().items()}, path / "action_head--150000_checkpoint.pt")
    torch.save(proprio.state_dict(), path / "proprio_projector--150000_checkpoint.pt")
    _, loaded, _ = hf.load_hf_checkpoint(str(path))

    states = rng.normal(size=(2, CHUNK * DIMS, WIDTH)).astype(np.float32)
    ours = L1ActionHead(CHUNK, DIMS, WIDTH).apply({"params": loaded["action_head"]}, jnp.asarray(states))
    with torch.no_grad():
        theirs = head(torch.from_numpy(states)).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=1e-5)

    state = rng.uniform(-1, 1, (4, PROPRIO)).astype(np.float32)
    ours = ProprioProjector(WIDTH).apply({"params": loaded["proprio_projector"]}, jnp.asarray(state))[:, 0]
    with torch.no_grad():
        theirs = proprio(torch.from_numpy(state)).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=1e-5)


def test_bidirectional_parallel_pass_matches_transformers_llama_with_a_padding_only_mask(tmp_path):
    config = dataclasses.replace(tiny_openvla_config(), action_head="parallel-tokens", chunk=CHUNK)
    rng = np.random.default_rng(3)
    import jax

    params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.3).astype(np.float32), hf.abstract_params(config))
    params["language_model"]["model"]["norm"]["scale"] = np.ones_like(params["language_model"]["model"]["norm"]["scale"])
    path = tmp_path / "hf"
    hf.save_hf_checkpoint(str(path), config, params)
    llama_cfg = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, rms_norm_eps=1e-6, pad_token_id=320)
    llm = transformers.LlamaForCausalLM(llama_cfg).eval()
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    llm.load_state_dict({k[len("language_model."):]: v for k, v in weights.items() if k.startswith("language_model.")})

    # Two rows, right-padded: prompt + slots + stop. Our embeddings (patches inserted, slots zeroed) go
    # into both models; theirs gets a 4-D mask that only removes padding keys.
    lengths, slots_n = [5, 8], CHUNK * DIMS
    width = max(lengths) + slots_n + 1
    ids = np.full((2, width), 320, np.int32)
    mask = np.zeros(ids.shape, bool)
    slots = np.zeros(ids.shape, bool)
    for i, n in enumerate(lengths):
        ids[i, :n + slots_n + 1] = [1] + list(rng.integers(4, 60, n - 1)) + [5] * slots_n + [2]
        mask[i, :n + slots_n + 1] = True
        slots[i, n:n + slots_n] = True
    pixels = rng.uniform(-2, 2, (2, 28, 28, 6)).astype(np.float32)
    model = OpenVLA(config)
    embeds, full_mask = model.apply({"params": params}, pixels, ids, mask, None, slots, method=OpenVLA.embed_inputs)
    ours = model.apply({"params": params}, pixels, ids, mask, None, slots, method=OpenVLA.hidden_states)
    ours_at_slots = np.asarray(gather_slots(ours, jnp.asarray(slots), config))

    keys = torch.from_numpy(np.array(full_mask))
    additive = torch.zeros(keys.shape[0], 1, keys.shape[1], keys.shape[1])
    additive = additive.masked_fill(~keys[:, None, None, :], torch.finfo(torch.float32).min)
    positions = torch.from_numpy(np.maximum(np.cumsum(np.asarray(full_mask), axis=1) - 1, 0))
    with torch.no_grad():
        out = llm.model(inputs_embeds=torch.from_numpy(np.asarray(embeds)), attention_mask=additive,
                        position_ids=positions).last_hidden_state.numpy()
    theirs_at_slots = np.asarray(gather_slots(jnp.asarray(out), jnp.asarray(slots), config))
    np.testing.assert_allclose(ours_at_slots, theirs_at_slots, atol=1e-4, rtol=1e-4)
    # The check bites: a causal pass differs at the slots.
    with torch.no_grad():
        causal = llm.model(inputs_embeds=torch.from_numpy(np.asarray(embeds)),
                           attention_mask=torch.from_numpy(np.asarray(full_mask)).long()).last_hidden_state.numpy()
    assert np.abs(np.asarray(gather_slots(jnp.asarray(causal), jnp.asarray(slots), config)) - theirs_at_slots).max() > 1e-3


class PeftLinear(torch.nn.Module):
    """A Linear as PEFT's LoRA holds it in OFT's training (the state-dict names are what matter)."""

    def __init__(self, linear, rank):
        super().__init__()
        self.base_layer = linear
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(linear.in_features, rank, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(rank, linear.out_features, bias=False)})
        self.scaling = min(rank, 16) / rank

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling


class FiLMBlock(torch.nn.Module):
    """OFT's FiLMedVisionTransformerBlock: the timm block under ``block``, ``scale`` / ``shift`` beside it."""

    def __init__(self, block, vision_dim, llm_dim):
        super().__init__()
        self.block = block
        self.scale = torch.nn.Linear(llm_dim, vision_dim)
        self.shift = torch.nn.Linear(llm_dim, vision_dim)


def _peft_wrap(module, rank):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, PeftLinear(child, rank))
        else:
            _peft_wrap(child, rank)


def test_film_matches_a_torch_restatement_on_timm_blocks(tmp_path):
    """OFT+'s FiLM: in every ViT block, after the attention residual, x * (1 + scale(l)) + shift(l), with
    l the mean embedding of the non-slot prompt tokens; timm blocks re-run by hand with that inserted.
    The weights go through OFT's ``vision_backbone--*.pt`` file: loaded strictly into OFT's module
    structure (FiLM wrapper + PEFT LoRA), given a non-zero LoRA there, and read back by ovla-jax."""
    from timm.models.vision_transformer import VisionTransformer

    from ovla_jax.checkpoints import oft

    config = dataclasses.replace(tiny_openvla_config(), film=True)
    rng = np.random.default_rng(4)
    import jax

    params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.2).astype(np.float32), hf.abstract_params(config))
    hf.save_hf_checkpoint(str(tmp_path / "film"), config, params)
    vision_file = tmp_path / "film" / "vision_backbone--latest_checkpoint.pt"
    state = torch.load(str(vision_file), weights_only=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "film" / "model.safetensors"), "np") as f:  # the merged model: no FiLM
        assert not any(oft.is_film_param(k) for k in f.keys()) and any(k.startswith("vision_backbone.") for k in f.keys())
    dino = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2,
                             init_values=1e-5, reg_tokens=4, no_embed_class=True, num_classes=0).eval()
    _peft_wrap(dino, oft.OFT_LORA_RANK)
    dino.blocks = torch.nn.Sequential(*[FiLMBlock(b, 32, config.llm.hidden_size) for b in dino.blocks])
    prefix = "vision_backbone.featurizer."
    # OpenVLA's HF code names LayerScale's gamma "scale_factor"
    dino.load_state_dict({k[len(prefix):].replace(".scale_factor", ".gamma"): v for k, v in state.items()
                          if k.startswith(prefix)}, strict=True)
    with torch.no_grad():  # a LoRA that OFT trained: ovla-jax must merge it with OFT's scaling
        for m in dino.modules():
            if isinstance(m, PeftLinear):
                m.lora_B["default"].weight.normal_(0, 0.1)
                m.lora_A["default"].weight.normal_(0, 0.1)
    state.update({prefix + k.replace(".gamma", ".scale_factor"): v for k, v in dino.state_dict().items()})
    torch.save(state, str(vision_file))
    (tmp_path / "film" / "vision_backbone--latest_checkpoint.safetensors").unlink()
    _, params, _ = hf.load_hf_checkpoint(str(tmp_path / "film"))

    ids = np.array([[1, 9, 12, 30, 5, 320, 320]], np.int32)
    mask = ids != 320
    pixels = rng.uniform(-2, 2, (1, 28, 28, 6)).astype(np.float32)
    model = OpenVLA(config)
    text = np.asarray(model.apply({"params": params}, jnp.asarray(ids), method=lambda m, i: m.language_model.embed(i)))
    language = torch.from_numpy(text[0, mask[0]].mean(0, keepdims=True))
    ours = model.apply({"params": params}, pixels, method=OpenVLA.embed_images,
                       language=jnp.asarray(language.numpy()))
    with torch.no_grad():
        x = dino._pos_embed(dino.patch_embed(torch.from_numpy(pixels[..., :3]).permute(0, 3, 1, 2)))
        for film in dino.blocks[:2]:  # the feature block is the second to last
            block = film.block
            x = x + block.ls1(block.attn(block.norm1(x)))
            x = x * (1 + film.scale(language)[:, None]) + film.shift(language)[:, None]
            x = x + block.ls2(block.mlp(block.norm2(x)))
        theirs = x[:, 5:].numpy()
    ours_dino = model.apply({"params": params}, jnp.asarray(pixels), jnp.asarray(language.numpy()),
                            method=lambda m, p, l: m.vision_backbone(p, l))[..., :32]
    np.testing.assert_allclose(np.asarray(ours_dino), theirs, atol=1e-4, rtol=1e-4)
    assert ours.shape == (1, config.num_patches, config.llm.hidden_size)
    with torch.no_grad():  # the check bites: the same blocks without FiLM give other features
        x = dino._pos_embed(dino.patch_embed(torch.from_numpy(pixels[..., :3]).permute(0, 3, 1, 2)))
        for film in dino.blocks[:2]:
            x = film.block(x)
        plain = x[:, 5:].numpy()
    assert np.abs(plain - theirs).max() > 1e-2
