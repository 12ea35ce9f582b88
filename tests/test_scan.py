"""Scanned layers (``scan_layers``): the same numerics as the unrolled model, params stacked on an
unsharded leading axis, and checkpoints that keep per-layer names both ways, bit-exact."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.linen import meta
from jax.sharding import PartitionSpec as P

from ovla_jax import sharding
from ovla_jax.checkpoints.hf import HF, save_checkpoint
from ovla_jax.checkpoints.sharded import load_sharded_params
from ovla_jax.checkpoints.tensor_dir import TensorDir
from ovla_jax.models.lora import LoRA
from ovla_jax.models.openvla import OpenVLA, greedy_decode
from ovla_jax.models.scan import is_scanned, layer_of, stack_layers, unstack_layers
from ovla_jax.train.step import loss_and_metrics
from tests.conftest import tiny_config
from tests.helpers import max_scaled_diff, random_params, random_pixels
from tests.test_train import make_batch


def _inputs(config):
    ids = np.array([[1, 5, 6, 7, 8, 9], [1, 9, 10, 11, 0, 0]], np.int32)
    return random_pixels(config, 2), ids, ids != 0


def test_stack_and_unstack_are_inverse_and_match_the_scanned_tree():
    config = tiny_config()
    params = random_params(config)
    stacked = stack_layers(params)
    assert is_scanned(stacked) and not is_scanned(params)
    layers = stacked["language_model"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert layers.shape == (config.llm.num_layers, 64, 128)
    np.testing.assert_array_equal(layers[1], params["language_model"]["model"]["layers_1"]["mlp"]["up_proj"]["kernel"])
    model = OpenVLA(config, scan_layers=True)
    px, ids, _ = _inputs(config)
    abstract = meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), px[:1], ids[:1]))["params"])
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, stacked)
    back = traverse_util.flatten_dict(unstack_layers(stacked))
    assert back.keys() == traverse_util.flatten_dict(params).keys()
    assert all(np.array_equal(v, traverse_util.flatten_dict(params)[k]) for k, v in back.items())
    assert layer_of(("vision_backbone", "featurizer", "blocks_12", "attn", "qkv", "kernel")) == (
        ("vision_backbone", "featurizer", "blocks", "attn", "qkv", "kernel"), 12)
    assert layer_of(("projector", "fc1", "kernel")) is None
    with pytest.raises(ValueError, match="not 0..1"):
        stack_layers({"layers_0": {"w": np.zeros(2)}, "layers_2": {"w": np.zeros(2)}})


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scanned_model_gives_the_unrolled_logits_gradients_and_tokens(remat):
    config = tiny_config()
    params = random_params(config)
    px, ids, mask = _inputs(config)
    plain, scanned = OpenVLA(config), OpenVLA(config, scan_layers=True, remat=remat)
    stacked = stack_layers(params)
    want = jax.jit(plain.apply)({"params": params}, px, ids, mask)
    got = jax.jit(scanned.apply)({"params": stacked}, px, ids, mask)
    assert max_scaled_diff(got, want) <= 1e-5  # same math, fp32 reduction order at most

    batch = make_batch(config)
    loss = lambda m: jax.jit(jax.value_and_grad(lambda p: loss_and_metrics(p, m, batch, num_labels=8, num_datasets=1)[0]))
    l_plain, g_plain = loss(plain)(params)
    l_scan, g_scan = loss(scanned)(stacked)
    assert abs(float(l_scan) - float(l_plain)) <= 1e-5 * abs(float(l_plain))
    assert max_scaled_diff(unstack_layers(jax.device_get(g_scan)), g_plain) <= 1e-4
    # the towers' unused last block gets no gradient in either layout (its layer is skipped at run time)
    last = config.vision[0].depth - 1
    assert not np.any(np.asarray(g_scan["vision_backbone"]["featurizer"]["blocks"]["mlp"]["fc1"]["kernel"][last]))

    t_plain, _ = greedy_decode(plain, params, px, ids, mask, num_tokens=7)
    t_scan, _ = greedy_decode(scanned, stacked, px, ids, mask, num_tokens=7)
    np.testing.assert_array_equal(t_scan, t_plain)


def test_scanned_vit_exposes_every_block_when_full():
    from ovla_jax.models.vit import ViT

    cfg = tiny_config().vision[0]
    images = np.random.default_rng(0).normal(size=(2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    plain, scanned = ViT(cfg), ViT(cfg, scan=True)
    params = meta.unbox(plain.init(jax.random.PRNGKey(0), images)["params"])
    stacked = stack_layers(params)
    f_plain, i_plain = plain.apply({"params": params}, images, full=True)
    f_scan, i_scan = scanned.apply({"params": stacked}, images, full=True)
    assert set(i_scan) == set(i_plain)
    assert max_scaled_diff({k: i_scan[k] for k in i_plain}, i_plain) <= 1e-5
    fast, _ = scanned.apply({"params": stacked}, images)
    assert max_scaled_diff(fast, f_plain) <= 1e-5


def test_scanned_params_shard_per_rules_with_an_unsharded_layer_axis():
    config = tiny_config()
    model = OpenVLA(config, scan_layers=True, lora=LoRA(rank=4))
    px, ids, _ = _inputs(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), px[:1], ids[:1]))["params"]
    shardings = sharding.param_shardings(boxed, sharding.make_mesh({"fsdp": 4, "tensor": 2}))
    layers = shardings["language_model"]["model"]["layers"]
    assert layers["mlp"]["up_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert layers["mlp"]["up_proj"]["lora_a"].spec == P(None, "fsdp", None)
    assert layers["input_layernorm"]["scale"].spec == P(None, None)
    qkv = shardings["vision_backbone"]["featurizer"]["blocks"]["attn"]["qkv"]["kernel"]
    assert qkv.spec == P(None, "fsdp", "tensor")


def test_hf_checkpoint_loads_into_the_scanned_model_and_exports_back_bit_exact(tmp_path):
    config = tiny_config()
    params = random_params(config, seed=5)
    src = str(tmp_path / "hf")
    save_checkpoint(src, HF, config, params)
    model = OpenVLA(config, scan_layers=True)
    px, ids, _ = _inputs(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), px[:1], ids[:1]))["params"]
    shardings = sharding.param_shardings(boxed, sharding.make_mesh({"fsdp": 4, "tensor": 2}))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), meta.unbox(boxed), shardings)
    loaded = load_sharded_params(src, target)
    up = loaded["language_model"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.sharding.spec == P(None, "fsdp", "tensor") and up.addressable_shards[0].data.shape == (2, 16, 64)
    dst = str(tmp_path / "back")
    save_checkpoint(dst, HF, config, unstack_layers(jax.device_get(loaded)))
    a, b = TensorDir(src, HF.stem), TensorDir(dst, HF.stem)
    assert a.files.keys() == b.files.keys()
    for key in a.files:
        x, y = a.read(key), b.read(key)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), key


def test_modes_that_pick_one_llm_layer_refuse_scanned_layers():
    from ovla_jax.train import optimizer as O

    with pytest.raises(ValueError, match="scan_layers=False"):
        O.trainable_patterns("last_layer", 32, scan_layers=True)
    assert O.trainable_patterns("full", 32, scan_layers=True) == [".*"] + list(O.OFT_PARTS)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "..", "shared", "data", "bridge_dataset")


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="Bridge sample not in ../shared")
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_scanned_lora_run_exports_per_layer_and_refuses_a_flipped_resume(tmp_path):
    from ovla_jax.checkpoints.jax_format import load_jax_checkpoint
    from ovla_jax.convert import convert
    from ovla_jax.models.lora import merge_lora
    from ovla_jax.checkpoints.train_dir import load_params
    from ovla_jax.train.loop import ConfigError, train
    from tests.test_train_loop import small_config

    cfg = small_config(tmp_path, num_steps=3, save_every=3, mode="lora", scan_layers=True, remat="full",
                       **{"lora.rank": 4, "optimizer.lr": 1e-2})
    result = train(cfg, str(tmp_path / "run"), progress=False)
    params = jax.device_get(result.state.params)
    assert is_scanned(params)
    # alpha unset: upstream's min(rank, 16) = 4, scale 1
    want = traverse_util.flatten_dict(unstack_layers(merge_lora(params, LoRA(rank=4, alpha=4.0))))
    convert(str(tmp_path / "run"), str(tmp_path / "export"), "train", "jax", progress=False)
    _, exported, _ = load_jax_checkpoint(str(tmp_path / "export"))
    exported = traverse_util.flatten_dict(exported)
    assert exported.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(exported[k], want[k], rtol=0, atol=1e-6, err_msg=str(k))
    _, host, _, _ = load_params(str(tmp_path / "run"))
    assert traverse_util.flatten_dict(host).keys() == want.keys()

    cfg.scan_layers, cfg.num_steps = False, 6
    with pytest.raises(ConfigError, match="scan_layers=True"):
        train(cfg, str(tmp_path / "run"), progress=False)
