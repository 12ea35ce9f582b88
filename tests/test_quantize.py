"""Weight-only quantization: int8 per output channel and int4 per group of input rows, half a step of
error at most, the 7B model's stored weights under 8.5 GB (int8) and 4.6 GB (int4), and quantized
policies tracking the fp32 one."""
import dataclasses

import jax
import numpy as np
import pytest

from ovla_jax import quantize as Q
from ovla_jax.checkpoints.hf import abstract_params
from ovla_jax.models.config import openvla_config, tiny_openvla_config


def test_each_weight_is_within_half_a_step_of_its_channel_scale():
    w = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32) * np.linspace(0.01, 3.0, 16)
    w[:, 3] = 0.0  # an all-zero channel stays exactly zero
    q = Q.quantize_weight(w)
    assert q.values.dtype == np.int8 and q.scale.shape == (16,)
    back = np.asarray(Q.dequantize({"kernel": q})["kernel"])
    assert np.all(np.abs(back - w) <= np.asarray(q.scale) / 2 + 1e-7)
    assert np.all(back[:, 3] == 0.0)
    assert np.abs(np.asarray(q.values)).max() == 127  # the range is used


def test_int4_packs_two_weights_a_byte_within_half_a_step_of_their_group_scale():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(256, 8)).astype(np.float32)
    w[:128, 2] *= 50.0  # an outlier group coarsens only itself
    w[128:, 5] = 0.0
    q = Q.quantize_weight_int4(w)
    assert q.packed.dtype == np.uint8 and q.packed.shape == (128, 8) and q.scale.shape == (2, 8) and q.group == 128
    back = np.asarray(Q.dequantize({"kernel": q})["kernel"])
    step = np.repeat(np.asarray(q.scale), 128, axis=0)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    assert np.all(back[128:, 5] == 0.0)
    assert np.abs(back[128:, 2] - w[128:, 2]).max() < 0.2  # the other group of that channel stays fine
    levels = np.round(back / np.where(step > 0, step, 1))
    assert levels.min() == -7 and levels.max() == 7  # the range is used
    # Group sizes: 128 when it divides the rows, else the largest even common divisor (SigLIP's 4304 rows: 16).
    assert Q.int4_group(4096) == 128 and Q.int4_group(4304) == 16 and Q.int4_group(48) == 16
    assert Q.int4_group(7) == 0


def test_only_dense_kernels_are_quantized_and_the_7b_model_fits_8_5_gb():
    tiny = abstract_params(tiny_openvla_config())
    quantized = jax.eval_shape(Q.quantize_params, tiny)
    flat = jax.tree_util.tree_flatten_with_path(quantized, is_leaf=lambda x: isinstance(x, Q.Int8Weight))[0]
    kinds = {}
    for path, leaf in flat:
        name = path[-1].key
        kinds.setdefault(name, set()).add(type(leaf).__name__)
    assert kinds["kernel"] == {"Int8Weight", "ShapeDtypeStruct"}  # Dense kernels int8; the patch convs stay
    assert all(kinds[n] == {"ShapeDtypeStruct"} for n in kinds if n != "kernel")
    big = jax.eval_shape(Q.quantize_params, abstract_params(openvla_config()))
    assert Q.nbytes(big) <= 8.5e9, Q.nbytes(big)
    big4 = jax.eval_shape(lambda p: Q.quantize_params(p, "int4"), abstract_params(openvla_config()))
    # Half a byte a weight (3.4 GB) + one fp32 scale per 128 of them (0.2 GB) + what stays fp32 (the
    # 0.5 GB embedding table, norms, patch convs).
    assert Q.nbytes(big4) <= 4.6e9, Q.nbytes(big4)
    with pytest.raises(ValueError, match="quantize"):
        Q.quantize_params(tiny, "int2")


@pytest.mark.parametrize("mode, tolerance", [("int8", 0.05), ("int4", 0.3)])
def test_quantized_policy_tracks_fp32(mode, tolerance):
    from ovla_jax.policy import OpenVLAPolicy
    from ovla_jax.tokenizer import WordTokenizer

    config = dataclasses.replace(tiny_openvla_config(image_size=56), action_head="l1", chunk=2)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.1).astype(np.float32), abstract_params(config))
    stats = {"toy": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 7}}}
    tok = WordTokenizer(config.tokenizer_vocab_size, config.n_action_bins)
    fp32 = OpenVLAPolicy(config, params, tok, stats, max_length=40)
    quantized = OpenVLAPolicy(config, params, tok, stats, max_length=40, quantize=mode)
    images = rng.integers(0, 255, (3, 56, 56, 3), np.uint8)
    want = fp32.predict_action(images, ["pick up the red block"] * 3)
    got = quantized.predict_action(images, ["pick up the red block"] * 3)
    # int8: weights off by <= 1/254 of their channel's range, int4 by <= 1/14 of their group's: outputs
    # move by about that, relative, per layer (random weights: no layer is robust to it by training).
    scale = np.abs(want).max()
    assert 0 < np.abs(got - want).max() < tolerance * scale


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_large_quantized_kernels_multiply_a_block_of_columns_at_a_time(mode, monkeypatch):
    """A quantized kernel over ``QUANTIZED_BLOCK`` weights (the 7B LM head) is converted and multiplied a
    block of output columns at a time, each block after the last: the same product as in one piece."""
    import flax
    import jax.numpy as jnp

    from ovla_jax.models import layers

    dense = layers.dense(48, ("embed", "mlp"), dtype=jnp.float32)
    x = np.random.default_rng(0).normal(size=(2, 5, 256)).astype(np.float32)
    params = flax.linen.meta.unbox(dense.init(jax.random.PRNGKey(0), x)["params"])
    params = {"kernel": Q.quantize_leaf(np.asarray(params["kernel"]), mode), "bias": params["bias"]}
    whole = np.asarray(dense.apply({"params": params}, x))
    monkeypatch.setattr(layers, "QUANTIZED_BLOCK", 256 * 10)  # 5 blocks of 9-10 columns
    blocks = jax.make_jaxpr(lambda p, x: dense.apply({"params": p}, x))(params, x)
    assert sum(eqn.primitive.name == "dot_general" for eqn in blocks.eqns) == 5
    np.testing.assert_allclose(np.asarray(dense.apply({"params": params}, x)), whole, rtol=1e-6, atol=1e-6)
    want = x @ np.asarray(Q.dequantize_weight(params["kernel"]))
    np.testing.assert_allclose(whole, want, rtol=1e-5, atol=1e-5)
