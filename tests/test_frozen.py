"""Frozen weights in low precision (LoRA on a bf16 base, QLoRA on int8 / int4): gradients within bf16
tolerance of the fp32 base's, quantized bases that train, one layer dequantized at a time in the compiled
step, checkpoints without the base and an export that merges into the original base exactly."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.linen import meta

from ovla_jax import quantize as Q
from ovla_jax import sharding
from ovla_jax.compile_options import weight_loop_options
from ovla_jax.checkpoints import hf
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.models.config import LlamaConfig
from ovla_jax.models.lora import LoRA, lora_from_config, merged_kernel
from ovla_jax.models.openvla import OpenVLA
from ovla_jax.train import optimizer as O
from ovla_jax.train.frozen import FrozenForm, apply_form, partition
from ovla_jax.train.step import Trainer, loss_and_metrics
from tests.conftest import tiny_config
from tests.helpers import random_params
from tests.test_train import make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "..", "shared", "data", "bridge_dataset")
needs_sample = pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="Bridge sample not in ../shared")
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def lora_setup(config, rank=4, scan=False, remat="none", dtype=jnp.float32):
    model = OpenVLA(config, dtype=dtype, lora=LoRA(rank=rank, alpha=float(rank)), scan_layers=scan, remat=remat)
    batch = make_batch(config)
    abstract = meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch["pixel_values"][:1],
                                                            batch["input_ids"][:1]))["params"])
    mask = O.trainable_mask(abstract, O.trainable_patterns("lora", config.llm.num_layers, scan))
    return model, batch, abstract, mask


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| over every leaf of two gradient trees together."""
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]).astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_lora_gradients_with_a_bf16_base_match_the_fp32_base():
    """The adapters' gradients on a base stored in bf16 are the fp32 base's within bf16 rounding: every
    base weight is off by at most 2^-9 relative (at bf16 compute the kernels were cast to bf16 anyway;
    biases, norms and embeddings round differently), so the gradient moves by a small multiple of that
    (0.35% measured, against a bound of 5 x 2^-8 = 2%), over all adapters together (a single leaf with a
    near-zero gradient has no meaningful relative error)."""
    config = tiny_config()
    for dtype in (jnp.bfloat16, jnp.float32):
        model, batch, abstract, mask = lora_setup(config, dtype=dtype)
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.1).astype(np.float32), abstract)
        grads = {}
        for name, form in (("fp32", FrozenForm("float32")), ("bf16", FrozenForm("bfloat16"))):
            stored = apply_form(params, mask, form)
            train, frozen = partition(stored, mask)
            assert {str(x.dtype) for x in jax.tree.leaves(frozen)} == {name.replace("bf16", "bfloat16").replace(
                "fp32", "float32")}
            assert {str(x.dtype) for x in jax.tree.leaves(train)} == {"float32"}

            def loss(t, frozen=frozen):
                from ovla_jax.train.frozen import combine
                return loss_and_metrics(combine(t, frozen), model, batch, num_labels=8, num_datasets=1)[0]

            grads[name] = jax.jit(jax.grad(loss))(train)
        diff = rel_l2(grads["bf16"], grads["fp32"])
        assert 0 < diff <= 5 * 2 ** -8, (dtype, diff)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_frozen_bases_train(mode):
    """A LoRA on an int8 / int4 base (scanned layers, remat, fsdp over 8 devices) overfits a fixed batch:
    the loss falls, only adapters move, the base stays quantized and untouched."""
    config = tiny_config()
    model, batch, abstract, mask = lora_setup(config, rank=8, scan=True, remat="full", dtype=jnp.bfloat16)
    mesh = sharding.make_mesh({"fsdp": -1})
    t = Trainer(model, O.make_optimizer(lr_schedule=O.schedule("constant", 1e-2)), mesh, trainable=mask,
                frozen_form=FrozenForm("bfloat16", mode))
    state = t.init(jax.random.PRNGKey(0), batch)
    step = t.compile_step(sharding.batch_sharding(mesh))
    flat = traverse_util.flatten_dict(state.params)
    quantized = {p for p, v in flat.items() if Q.is_quantized(v)}
    assert quantized and all(flat[p].kernel_shape[0] == config.llm.num_layers for p in quantized
                             if "language_model" in p and "layers" in p)
    before = jax.device_get(state.params)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    # From ln(384) = 5.95 (a random base): the adapters alone take it down by most of a nat in 20 steps.
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.4, losses
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    before = traverse_util.flatten_dict(before)
    changed = {p for p in before if not all(np.array_equal(x, y) for x, y in
                                            zip(jax.tree.leaves(before[p]), jax.tree.leaves(after[p])))}
    assert any(p[-1] == "lora_b" for p in changed) and all(p[-1] in ("lora_a", "lora_b") for p in changed)
    assert all(Q.is_quantized(after[p]) for p in quantized)


def test_the_step_dequantizes_one_layer_at_a_time():
    """Compiled memory, not intent: with an int8 base under scanned layers the step's temporaries stay far
    below the base's dequantized size, while dequantizing the whole tree first (what the policy used to do)
    needs at least that much."""
    llm = LlamaConfig(vocab_size=384, hidden_size=256, intermediate_size=1024, num_layers=16, num_heads=4)
    config = tiny_config(llm=llm)
    model, batch, abstract, mask = lora_setup(config, scan=True, remat="full", dtype=jnp.bfloat16)
    batch = jax.tree.map(lambda a: a[:1], batch)
    params = apply_form(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract), mask, FrozenForm("bfloat16", "int8"))
    train, frozen = partition(params, mask)
    dense = sum(int(np.prod(x.kernel_shape)) * 2 for x in jax.tree.leaves(frozen, is_leaf=Q.is_quantized)
                if Q.is_quantized(x))  # the quantized kernels in bf16

    def temporaries(dequantize_first):
        def loss(t, f):
            from ovla_jax.train.frozen import combine
            f = Q.dequantize(f, jnp.bfloat16) if dequantize_first else f
            return loss_and_metrics(combine(t, f), model, batch, num_labels=8, num_datasets=1)[0]
        compiled = jax.jit(jax.grad(loss)).lower(train, frozen).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    per_layer, whole = temporaries(False), temporaries(True)
    print(f"temporaries: {per_layer / 2**20:.1f} MiB dequantizing per layer, {whole / 2**20:.1f} MiB dequantizing "
          f"first; the quantized kernels take {dense / 2**20:.1f} MiB in bf16")
    assert per_layer < 0.35 * dense <= whole


def test_frozen_settings_that_cannot_work_are_config_errors(tmp_path):
    from configs.train import debug
    from ovla_jax.train.loop import ConfigError, build, train

    c = debug.get_config("full")
    c.frozen_quantize = "int8"
    with pytest.raises(ConfigError, match="frozen_quantize='int8' with mode='full'"):
        build(c, tiny_config(), 1)
    c = debug.get_config("lora")
    c.frozen_dtype = "float16"
    with pytest.raises(ConfigError, match="frozen_dtype 'float16'"):
        build(c, tiny_config(), 1)
    c = debug.get_config("lora")
    c.frozen_quantize = "int8"
    c.data.stats_cache_dir = str(tmp_path / "stats")
    if os.path.isdir(SAMPLE):
        with pytest.raises(ConfigError, match="frozen_quantize='int8' needs init_checkpoint"):
            train(c, str(tmp_path / "run"), progress=False)


def test_lora_alpha_defaults_to_upstreams_min_of_rank_and_16():
    from configs.train import finetune_bridge

    assert lora_from_config({"rank": 8}).scale == 1.0 and lora_from_config({"rank": 32}).scale == 0.5
    assert lora_from_config({"rank": 8, "alpha": None}).alpha == 8.0
    assert lora_from_config({"rank": 8, "alpha": 32.0}).scale == 4.0  # an explicit alpha is kept
    c = finetune_bridge.get_config("lora")
    assert c.lora.alpha is None and lora_from_config(c.lora).alpha == 16.0
    c.lora.rank = 8
    assert lora_from_config(c.lora).scale == 1.0  # --config.lora.rank=8 trains at upstream's scale


@needs_sample
@needs_8
def test_qlora_run_saves_no_base_and_exports_into_the_original_base(tmp_path):
    """int8 QLoRA from a bf16 base checkpoint: the train checkpoint holds only the adapters; resume reads
    the base back; the export merges W + A @ B * scale in fp32 into the base's own bf16 weights (bit for
    bit, not into the quantized copy); a policy loads the run; a moved or different base is named."""
    from ovla_jax.checkpoints.jax_format import load_jax_checkpoint
    from ovla_jax.checkpoints.train_dir import TrainSource, param_metadata, resolve
    from ovla_jax.convert import convert
    from ovla_jax.policy import OpenVLAPolicy
    from ovla_jax.train.loop import ConfigError, train
    from tests.test_train_loop import small_config

    config = tiny_config()
    base = str(tmp_path / "base")
    hf.save_hf_checkpoint(base, config, random_params(config, seed=11, scale=0.05), {}, dtype="bfloat16")
    cfg = small_config(tmp_path, num_steps=3, save_every=3, mode="lora", scan_layers=True, remat="full",
                       init_checkpoint=base, frozen_quantize="int8", dtype="bfloat16",
                       **{"lora.rank": 4, "optimizer.lr": 1e-2})
    run = str(tmp_path / "run")
    result = train(cfg, run, progress=False)
    assert result.status == "done"
    stored = param_metadata(resolve(run))
    assert stored and all(p[-1] in ("lora_a", "lora_b") for p in stored)  # no base tensor was saved
    kinds = {type(x).__name__ for x in jax.tree.leaves(result.state.params, is_leaf=Q.is_quantized)}
    assert "Int8Weight" in kinds

    cfg.num_steps = 4
    again = train(cfg, run, progress=False)  # resume: the base is read back from init_checkpoint
    assert again.status == "done" and again.step == 4

    convert(run, str(tmp_path / "export"), "train", "jax", progress=False)
    _, exported, _ = load_jax_checkpoint(str(tmp_path / "export"))
    _, original, _ = hf.load_hf_checkpoint(base)
    source = TrainSource(run)
    lora = source.lora
    adapters = traverse_util.flatten_dict(jax.device_get(again.state.params))
    exported, original = traverse_util.flatten_dict(exported), traverse_util.flatten_dict(original)
    assert exported.keys() == original.keys()
    merged = 0
    from ovla_jax.models.scan import layer_of
    for path, w in original.items():
        got = exported[path]
        assert got.dtype == w.dtype, path  # the base's own precision
        stack = layer_of(path)  # the run scanned its layers: their adapters are stacked
        key, layer = stack if stack is not None else (path, None)
        a_path = key[:-1] + ("lora_a",)
        if path[-1] == "kernel" and a_path in adapters:
            a, b = adapters[a_path], adapters[key[:-1] + ("lora_b",)]
            a, b = (a, b) if layer is None else (a[layer], b[layer])
            np.testing.assert_array_equal(got, merged_kernel(w, a, b, lora), err_msg=str(path))
            merged += 1
        else:
            np.testing.assert_array_equal(got, w, err_msg=str(path))
    assert merged > 10

    policy = OpenVLAPolicy.from_pretrained(run, dtype="bfloat16", quantize="int8")
    assert np.isfinite(policy.predict_action(np.zeros((32, 32, 3), np.uint8), "pick up the block")).all()

    moved = str(tmp_path / "moved")
    shutil.move(base, moved)
    with pytest.raises(CheckpointError, match="init_checkpoint .*base.* which is not there"):
        TrainSource(run)
    TrainSource(run, base=moved)  # told where it went: fine
    other = str(tmp_path / "other")
    hf.save_hf_checkpoint(other, config, random_params(config, seed=12, scale=0.05), {}, dtype="bfloat16")
    with pytest.raises(CheckpointError, match="not the checkpoint this run was trained from"):
        TrainSource(run, base=other)
    shutil.rmtree(moved)
    shutil.copytree(other, base)
    cfg.num_steps = 5
    with pytest.raises(ConfigError, match="was trained on the base"):
        train(cfg, run, progress=False)
