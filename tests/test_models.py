"""Model tests on tiny configs: shapes, KV-cache decoding vs recomputation, padding invariance,
and the real-size variants by shape only (jax.eval_shape, nothing materialized)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ovla_jax.checkpoints import hf
from ovla_jax.models.config import openvla_config, vit_config
from ovla_jax.models.openvla import OpenVLA, greedy_decode
from ovla_jax.models.vit import ViT
from tests.conftest import tiny_config
from tests.helpers import random_params, random_pixels


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    # Init-scale weights: logits O(1), so 1e-5 absolute is ~1e-6 relative (fp32 reduction-order noise).
    return config, OpenVLA(config), random_params(config, seed=0, scale=0.15)


def _full_recompute_greedy(model, params, pixels, ids, n):
    """Reference decoding without a cache: rerun the whole sequence for every token."""
    ids = np.asarray(ids)
    tokens, logits = [], []
    apply = jax.jit(model.apply)
    for _ in range(n):
        out = np.asarray(apply({"params": params}, pixels, jnp.asarray(ids)))
        logits.append(out[:, -1])
        tokens.append(out[:, -1].argmax(-1))
        ids = np.concatenate([ids, tokens[-1][:, None]], axis=1)
    return np.stack(tokens, 1), np.stack(logits, 1)


def test_logits_shape_and_dtype(setup):
    config, model, params = setup
    ids = jnp.ones((2, 5), jnp.int32)
    logits = model.apply({"params": params}, random_pixels(config, 2), ids, jnp.ones((2, 5), bool))
    assert logits.shape == (2, 5 + config.num_patches, config.llm.vocab_size)
    assert logits.dtype == jnp.float32


def test_kv_cache_decoding_equals_full_recomputation(setup):
    config, model, params = setup
    pixels = random_pixels(config, 2)
    ids = np.array([[1, 5, 9, 13, 17, 21], [1, 6, 10, 14, 18, 22]], np.int32)
    tokens, logits = greedy_decode(model, params, pixels, ids, num_tokens=7)
    want_tokens, want_logits = _full_recompute_greedy(model, params, pixels, ids, 7)
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
    assert np.abs(np.asarray(logits) - want_logits).max() <= 1e-5
    assert np.abs(want_logits).max() > 0.5
    assert len(set(want_tokens.ravel().tolist())) > 1  # a decode that varies, not a constant


@pytest.mark.parametrize("layout", ["right", "after_bos"])
def test_padded_batch_decodes_like_each_row_alone(setup, layout):
    config, model, params = setup
    pad = config.pad_token_id
    rows = [[1, 7, 8, 9], [1, 30, 31, 32, 33, 34, 35], [1, 50, 51, 52, 53]]
    pixels = random_pixels(config, 3, seed=7)
    width = max(map(len, rows))
    ids = np.full((3, width), pad, np.int32)
    mask = np.zeros((3, width), bool)
    for i, row in enumerate(rows):
        if layout == "right":
            ids[i, :len(row)], mask[i, :len(row)] = row, True
        else:  # [BOS] [pad ...] [text]: every row ends at the same index
            ids[i, 0], mask[i, 0] = row[0], True
            ids[i, width - len(row) + 1:], mask[i, width - len(row) + 1:] = row[1:], True
    tokens, logits = greedy_decode(model, params, pixels, ids, mask, num_tokens=7)
    for i, row in enumerate(rows):
        alone_tokens, alone_logits = greedy_decode(model, params, pixels[i:i + 1], np.array([row], np.int32), num_tokens=7)
        np.testing.assert_array_equal(np.asarray(tokens)[i], np.asarray(alone_tokens)[0])
        assert np.abs(np.asarray(logits)[i] - np.asarray(alone_logits)[0]).max() <= 1e-5


def test_vit_exposes_intermediates_and_feature_block():
    cfg = vit_config("dinov2-reg4-tiny/14", image_size=28)
    vit = ViT(cfg)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 3)), jnp.float32)
    variables = vit.init(jax.random.PRNGKey(0), images)
    features, inter = vit.apply(variables, images, full=True)
    assert features.shape == (2, cfg.num_patches, cfg.width)
    assert set(inter) >= {"block_0", "block_1", "block_2", "encoded", "pooled"}
    np.testing.assert_array_equal(features, inter[f"block_{cfg.depth - 2}"][:, cfg.num_prefix_tokens:])
    fast, fast_inter = vit.apply(variables, images)
    np.testing.assert_array_equal(fast, features)
    assert f"block_{cfg.depth - 1}" not in fast_inter  # the unused last block is skipped at run time


def test_single_tower_config_runs():
    config = tiny_config("siglip-vit-tiny")
    assert config.projector == "gelu-mlp"
    model = OpenVLA(config)
    params = random_params(config)
    logits = model.apply({"params": params}, random_pixels(config, 1), jnp.ones((1, 3), jnp.int32))
    assert logits.shape == (1, 3 + config.num_patches, config.llm.vocab_size)
    assert set(params["projector"]) == {"fc1", "fc2"}


def test_wrong_channel_count_is_a_clear_error(setup):
    config, model, params = setup
    with pytest.raises(ValueError, match="channels"):
        model.apply({"params": params}, np.zeros((1, 28, 28, 3), np.float32), jnp.ones((1, 3), jnp.int32))


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("vision_id,patches,vision_dim", [
    ("dinosiglip-vit-so-224px", 256, 2176),
    ("dinosiglip-vit-so-384px", 729, 2176),
    ("siglip-vit-so400m", 256, 1152),
    ("dinov2-vit-l", 256, 1024),
])
def test_real_size_variants_by_shape(vision_id, patches, vision_dim):
    config = openvla_config(vision_id)
    assert config.num_patches == patches and config.vision_dim == vision_dim
    params = hf.abstract_params(config)
    flat = traverse_util.flatten_dict(params)
    assert flat[("language_model", "model", "embed_tokens", "embedding")].shape == (32064, 4096)
    assert flat[("language_model", "lm_head", "kernel")].shape == (4096, 32064)
    fc1 = flat[("projector", "fc1", "kernel")].shape
    assert fc1 == ((vision_dim, 4 * vision_dim) if len(config.vision) == 2 else (vision_dim, 4096))


def test_openvla_7b_parameter_count():
    # 7,541,237,184 = DINOv2-L/14-reg4 (304.4M) + SigLIP So400m (428.2M, attn-pool head included)
    # + projector (91.0M) + Llama-2-7B with vocab 32064 (6,738.4M + 2 x 64 x 4096).
    assert _count(hf.abstract_params(openvla_config("dinosiglip-vit-so-224px"))) == 7_541_237_184


def test_every_param_has_logical_axis_names():
    """The sharding rules table can only shard what is annotated: every param must be."""
    import flax.linen as nn

    config = tiny_config()
    model = OpenVLA(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 6)), jnp.ones((1, 2), jnp.int32)))
    flat = traverse_util.flatten_dict(boxed["params"])
    assert flat
    for path, leaf in flat.items():
        assert isinstance(leaf, nn.Partitioned), "/".join(path)
        assert len(leaf.names) == len(leaf.value.shape), "/".join(path)
    kernel = flat[("language_model", "model", "layers_0", "mlp", "up_proj", "kernel")]
    assert kernel.names == ("embed", "mlp")


@pytest.mark.parametrize("variant", ["7b", "siglip", "dinov2", "dinosiglip-384", "tiny"])
def test_model_config_files(variant):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "model_cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "model", "openvla.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from ovla_jax.models.config import from_config_dict

    config = from_config_dict(module.get_config(variant))
    if variant == "7b":
        assert _count(hf.abstract_params(config)) == 7_541_237_184
        assert config.tokenizer_vocab_size == 32000
    if variant == "tiny":
        logits = OpenVLA(config).apply({"params": random_params(config)}, random_pixels(config, 1), jnp.ones((1, 3), jnp.int32))
        assert logits.shape == (1, 3 + config.num_patches, config.llm.vocab_size)
    with pytest.raises(ValueError, match="unknown model variant"):
        module.get_config("13b-typo")


def test_bf16_compute_keeps_fp32_logits_and_tracks_fp32(setup):
    config, model, params = setup
    pixels, ids = random_pixels(config, 2), jnp.ones((2, 4), jnp.int32)
    want = np.asarray(model.apply({"params": params}, pixels, ids))
    got = OpenVLA(config, dtype=jnp.bfloat16).apply({"params": params}, pixels, ids)
    assert got.dtype == jnp.float32
    err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert 0 < err < 0.05  # bf16 rounding is visible, but small relative to the logit scale


def _low_precision_products(jaxpr, found):
    """Every dot_general / conv in a jaxpr (sub-jaxprs included): (operand dtypes, result dtype)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars),
                          str(eqn.outvars[0].aval.dtype)))
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (list, tuple)) else [value]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _low_precision_products(inner, found)
    return found


def test_bf16_mode_multiplies_bf16_operands_into_fp32_accumulators(setup):
    # Every matmul (the patch embedding's included) and attention einsum: bf16 in, fp32 out (the
    # accumulator), as TPUs / GPUs do and what makes bf16 pay on CPUs; an fp32 result of bf16 operands
    # means preferred_element_type was set.
    config, model, params = setup
    pixels, ids = random_pixels(config, 1), jnp.ones((1, 4), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: OpenVLA(config, dtype=jnp.bfloat16).apply({"params": p}, pixels, ids))(params)
    products = _low_precision_products(jaxpr.jaxpr, [])
    kinds = {name for name, _, _ in products}
    assert kinds == {"dot_general"}, kinds  # the patch embedding is a matmul of flattened patches too
    assert len(products) > 10
    for name, operands, result in products:
        assert operands == ("bfloat16", "bfloat16") and result == "float32", (name, operands, result)
    # The GELUs (towers' MLPs, projector) act on the fp32 accumulators, rounded once when the next product
    # casts its input: one rounding instead of one per elementwise op.
    erfs = [str(e.invars[0].aval.dtype) for e in _equations(jaxpr.jaxpr) if e.primitive.name in ("erf", "erfc")]
    assert erfs and set(erfs) == {"float32"}, erfs


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (list, tuple)) else [value]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_low_precision_attention_tracks_fp32_with_masks_and_grouped_heads():
    from ovla_jax.models.layers import attention

    rng = np.random.default_rng(0)
    for kv_heads in (2, 4):  # grouped (2 queries per key head) and plain multi-head: two layouts
        q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
        k, v = (rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32) for _ in range(2))
        mask = np.ones((2, 1, 5, 7), bool)
        mask[1, :, :, 4:] = False  # padding keys in the second row
        want = np.asarray(attention(q, k, v, mask=mask))
        got = attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), mask=mask)
        assert got.dtype == jnp.bfloat16
        # bf16 keeps 8 significant bits (relative rounding 2^-9 per operand): outputs, convex mixtures of
        # v, move by a few of those units of max|v| through the rounded logits and probabilities.
        assert np.abs(np.asarray(got, np.float32) - want).max() < 0.03 * np.abs(v).max()
        # Padding keys get no weight: changing their values changes nothing.
        v2 = v.copy()
        v2[1, 4:] = 100.0
        again = attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v2)), mask=mask)
        np.testing.assert_array_equal(np.asarray(again[1], np.float32), np.asarray(got[1], np.float32))
