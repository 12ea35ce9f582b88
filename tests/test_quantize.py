"""int8 weight-only quantization: every Dense kernel per output channel, half a step of error at most,
the 7B model's stored weights under 8.5 GB, and an int8 policy tracking the fp32 one."""
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
    with pytest.raises(ValueError, match="quantize"):
        Q.quantize_params(tiny, "int4")


def test_int8_policy_tracks_fp32():
    from ovla_jax.policy import OpenVLAPolicy
    from ovla_jax.tokenizer import WordTokenizer

    config = dataclasses.replace(tiny_openvla_config(image_size=56), action_head="l1", chunk=2)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.1).astype(np.float32), abstract_params(config))
    stats = {"toy": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 7}}}
    tok = WordTokenizer(config.tokenizer_vocab_size, config.n_action_bins)
    fp32 = OpenVLAPolicy(config, params, tok, stats, max_length=40)
    int8 = OpenVLAPolicy(config, params, tok, stats, max_length=40, quantize="int8")
    images = rng.integers(0, 255, (3, 56, 56, 3), np.uint8)
    want = fp32.predict_action(images, ["pick up the red block"] * 3)
    got = int8.predict_action(images, ["pick up the red block"] * 3)
    # Weights off by <= 1/254 of their channel's range: outputs move by about that, relative, per layer.
    scale = np.abs(want).max()
    assert 0 < np.abs(got - want).max() < 0.05 * scale
