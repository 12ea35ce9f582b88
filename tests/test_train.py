"""Sharded training on 8 simulated CPU devices: equivalence with one device, shardings per the rules,
freezing, and overfitting a few frames."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from flax.linen import meta
from jax.sharding import PartitionSpec as P

from ovla_jax import sharding
from ovla_jax.data.batch import BatchTransform
from ovla_jax.models.openvla import OpenVLA
from ovla_jax.tokenizer import CharTokenizer
from ovla_jax.train import optimizer as O
from ovla_jax.train.step import Trainer, label_positions
from tests.conftest import tiny_config
from tests.helpers import max_scaled_diff

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def make_batch(config, n=8, seed=0):
    rng = np.random.default_rng(seed)
    bt = BatchTransform(CharTokenizer(vocab_size=config.tokenizer_vocab_size), max_length=96)
    instructions = [f"push the {c} block" for c in ("red", "blue", "green", "pink")] * (n // 4)
    rows = [bt.example(i, a) for i, a in zip(instructions, rng.uniform(-1, 1, (n, 7)))]
    size = config.vision[0].image_size
    return {"input_ids": jnp.asarray(np.stack([r[0] for r in rows])),
            "attention_mask": jnp.asarray(np.stack([r[1] for r in rows])),
            "labels": jnp.asarray(np.stack([r[2] for r in rows])),
            "pixel_values": jnp.asarray(rng.uniform(-1, 1, (n, size, size, 6)).astype(np.float32)),
            "dataset_id": jnp.zeros(n, jnp.int32)}


def trainer(config, mesh_axes, mode="full", lr=1e-3, devices=None, tx=None):
    mesh = sharding.make_mesh(mesh_axes, devices)
    model = OpenVLA(config)
    batch = make_batch(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch["pixel_values"][:1], batch["input_ids"][:1]))
    params_abstract = meta.unbox(boxed["params"])
    patterns = O.trainable_patterns(mode, config.llm.num_layers)
    if tx is None:
        tx = O.make_optimizer(lr_schedule=O.schedule("constant", lr), weight_decay=0.01)
    t = Trainer(model, tx, mesh, trainable=O.trainable_mask(params_abstract, patterns))
    state = t.init(jax.random.PRNGKey(0), batch)
    step = t.compile_step(sharding.batch_sharding(mesh))
    return t, state, step, batch


def test_label_positions_pick_the_tokens_after_each_prediction():
    labels = jnp.array([[-100, -100, 5, 6, -100], [-100, 7, 8, -100, -100]])
    index, targets, valid = label_positions(labels, num_patches=3, num_labels=2)
    # multimodal: [l0, p, p, p, l1, l2, ...]; hidden i predicts mm[i + 1]
    assert index.tolist() == [[4, 5], [3, 4]] and targets.tolist() == [[5, 6], [7, 8]] and valid.all()


def test_sharded_step_equals_single_device_step_and_shards_per_rules():
    """Sharding changes only the order of fp32 reductions, so loss and gradients agree to that noise
    (~1e-6 of each leaf's scale; checked at 1e-4). Params after an AdamW step are not compared: its first
    update is about lr * sign(grad), so noise in a near-zero gradient flips a whole lr-sized step."""
    from ovla_jax.train.step import loss_and_metrics

    config = tiny_config()
    lr = 1e-2
    t8, s8, step8, batch = trainer(config, {"data": 2, "fsdp": 2, "tensor": 2}, tx=optax.sgd(lr))
    t1, s1, step1, _ = trainer(config, {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1], tx=optax.sgd(lr))
    kernel = s8.params["language_model"]["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor") and len({d.id for d in kernel.sharding.device_set}) == 8
    assert kernel.addressable_shards[0].data.shape == (32, 64)  # [64, 128] split 2 x 2
    emb = s8.params["language_model"]["model"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")

    grad = jax.jit(jax.grad(lambda p, b: loss_and_metrics(p, t1.model, b, num_labels=8, num_datasets=1)[0]))
    g8 = grad(s8.params, jax.device_put(batch, sharding.batch_sharding(t8.mesh)))
    g1 = grad(s1.params, batch)
    assert g8["language_model"]["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert max_scaled_diff(g8, g1) <= 1e-4

    p1 = jax.device_get(s1.params)
    s8, m8 = step8(s8, batch)
    s1, m1 = step1(s1, batch)
    assert abs(float(m8["loss"]) - float(m1["loss"])) <= 1e-5 * abs(float(m1["loss"]))
    # SGD: new = old - lr * grad, so the params agree as the gradients do, up to fp32 rounding of the sum
    # (a few ulps of the param itself, which dominate where lr * grad << param).
    eps = np.finfo(np.float32).eps
    for (path, a), b, old in zip(traverse_util.flatten_dict(jax.device_get(s8.params)).items(),
                                 traverse_util.flatten_dict(jax.device_get(s1.params)).values(),
                                 traverse_util.flatten_dict(p1).values()):
        update = np.abs(np.asarray(b, np.float64) - old).max()
        assert np.abs(a - b).max() <= 1e-4 * update + 4 * eps * np.abs(old).max(), path
    assert max(np.abs(np.asarray(b, np.float64) - o).max() for b, o in zip(
        jax.tree.leaves(jax.device_get(s1.params)), jax.tree.leaves(p1))) > 1e-4  # the step did move the params


def test_adamw_optimizer_state_is_sharded_like_params():
    config = tiny_config()
    _, state, step, batch = trainer(config, {"data": 2, "fsdp": 2, "tensor": 2})
    mu = state.opt_state[1][0].mu
    assert mu["language_model"]["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
    state, metrics = step(state, batch)
    mu = state.opt_state[1][0].mu
    assert mu["language_model"]["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("mode", ["frozen_vision", "last_layer", "sandwich"])
def test_frozen_params_unchanged_and_without_optimizer_state(mode):
    config = tiny_config()
    t, state, step, batch = trainer(config, {"fsdp": -1}, mode=mode)
    before = traverse_util.flatten_dict(jax.device_get(state.params))
    for _ in range(2):
        state, _ = step(state, batch)
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    patterns = O.trainable_patterns(mode, config.llm.num_layers)
    labels = traverse_util.flatten_dict(O.trainable_labels(traverse_util.unflatten_dict(before), patterns))
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    frozen = {k for k, v in labels.items() if v == "freeze"}
    assert frozen and not (changed & frozen)
    # Every trainable kernel moves (by its gradient or, for the towers' unused last block, weight decay);
    # zero-initialized biases without a gradient may rightly stay zero.
    trainable_kernels = {k for k, v in labels.items() if v == "train" and k[-1] == "kernel"}
    assert trainable_kernels and trainable_kernels <= changed
    mu = state.opt_state[1][0].mu
    mu_leaves = {k for k, v in traverse_util.flatten_dict(mu).items() if hasattr(v, "shape")}
    assert mu_leaves == set(labels) - frozen


def test_tiny_model_overfits_eight_frames():
    config = tiny_config()
    _, state, step, batch = trainer(config, {"fsdp": -1}, lr=3e-3)
    for i in range(300):
        state, metrics = step(state, batch)
        if float(metrics["accuracy"]) == 1.0:
            break
    assert float(metrics["accuracy"]) == 1.0, (i, float(metrics["loss"]))
    assert float(metrics["l1"]) == 0.0


def test_lora_trains_only_adapters_and_merges_to_the_same_logits():
    from ovla_jax.models.lora import LoRA, merge_lora

    config = tiny_config()
    lora = LoRA(rank=4, alpha=8.0, dropout=0.1)
    mesh = sharding.make_mesh({"fsdp": -1})
    model = OpenVLA(config, lora=lora)
    batch = make_batch(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch["pixel_values"][:1], batch["input_ids"][:1]))
    patterns = O.trainable_patterns("lora", config.llm.num_layers)
    tx = O.make_optimizer(lr_schedule=O.schedule("constant", 1e-2))
    t = Trainer(model, tx, mesh, trainable=O.trainable_mask(meta.unbox(boxed["params"]), patterns))
    state = t.init(jax.random.PRNGKey(0), batch)
    step = t.compile_step(sharding.batch_sharding(mesh))
    before = traverse_util.flatten_dict(jax.device_get(state.params))
    adapters = {k for k in before if k[-1] in ("lora_a", "lora_b")}
    # every linear layer but the LM head is adapted (patch-embed conv and LM head are not linear layers here)
    kernels = {k[:-1] for k in before if k[-1] == "kernel" and "patch_embed" not in k and "lm_head" not in k}
    assert {k[:-1] for k in adapters} == kernels
    for _ in range(3):
        state, _ = step(state, batch)
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and changed <= adapters and any(k[-1] == "lora_b" for k in changed)
    mu = state.opt_state[1][0].mu
    assert {k for k, v in traverse_util.flatten_dict(mu).items() if hasattr(v, "shape")} == adapters

    params = jax.device_get(state.params)
    inputs = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    adapted = jax.jit(model.apply)({"params": params}, *inputs)
    merged = merge_lora(params, lora)
    assert not any(k[-1] in ("lora_a", "lora_b") for k in traverse_util.flatten_dict(merged))
    plain_apply = jax.jit(OpenVLA(config).apply)
    plain = plain_apply({"params": merged}, *inputs)
    base = plain_apply({"params": merge_lora(params, LoRA(rank=4, alpha=0.0))}, *inputs)
    assert max_scaled_diff(adapted, plain) <= 1e-5  # W + A @ B vs x @ W + x @ A @ B: rounding only
    assert max_scaled_diff(adapted, base) > 1e-3  # the adapters do change the model


def test_remat_policies_give_the_same_gradients():
    from ovla_jax.train.step import loss_and_metrics

    config = tiny_config()
    batch = make_batch(config)
    params = meta.unbox(OpenVLA(config).init(jax.random.PRNGKey(1), batch["pixel_values"][:1], batch["input_ids"][:1])["params"])
    grads = {}
    for policy in ("none", "full", "dots", "dots_all"):
        fn = lambda p, m=OpenVLA(config, remat=policy): loss_and_metrics(p, m, batch, num_labels=8, num_datasets=1)[0]
        grads[policy] = jax.jit(jax.grad(fn))(params)
    for policy in ("full", "dots", "dots_all"):  # recomputation may fuse differently: fp32 reduction-order noise only
        assert max_scaled_diff(grads[policy], grads["none"]) <= 1e-4, policy
    with pytest.raises(ValueError, match="unknown remat policy"):
        OpenVLA(config, remat="some").init(jax.random.PRNGKey(1), batch["pixel_values"][:1], batch["input_ids"][:1])


def test_frozen_params_cost_no_weight_gradients_and_change_nothing_else():
    """LoRA: the step differentiates only the trainable subtree, so the base's weight-gradient matmuls
    (about a third of a full step) never run, and the adapters' updates are what training everything
    with the base's updates zeroed gives."""
    from ovla_jax.models.lora import LoRA

    config = tiny_config()
    model = OpenVLA(config, lora=LoRA(rank=4, alpha=8.0))
    mesh = sharding.make_mesh({"fsdp": -1})
    batch = make_batch(config)
    params = meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch["pixel_values"][:1],
                                                          batch["input_ids"][:1]))["params"])
    patterns = O.trainable_patterns("lora", config.llm.num_layers)
    zeroed = optax.multi_transform({"train": optax.sgd(1e-2), "freeze": optax.set_to_zero()},
                                   O.trainable_labels(params, patterns))
    runs = {}
    for name, mask, tx in (("masked", O.trainable_mask(params, patterns), optax.sgd(1e-2)), ("all", None, zeroed)):
        t = Trainer(model, tx, mesh, trainable=mask)
        state = t.init(jax.random.PRNGKey(0), batch)
        step = t.compile_step(sharding.batch_sharding(mesh))
        flops = step.lower(state, batch).compile().cost_analysis()["flops"]
        before = jax.device_get(state.params)
        state, _ = step(state, batch)
        after = jax.device_get(state.params)
        runs[name] = (flops, jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, after, before))
    assert runs["masked"][0] < 0.8 * runs["all"][0], (runs["masked"][0], runs["all"][0])
    assert max_scaled_diff(runs["masked"][1], runs["all"][1]) <= 1e-4


def test_fan_in_init_rescales_fresh_kernels_and_embeddings_and_leaves_loaded_params_alone():
    from ovla_jax.models.lora import LoRA
    from ovla_jax.models.param_init import rescale_init

    config = tiny_config()
    mesh = sharding.make_mesh({"fsdp": -1})
    model = OpenVLA(config, lora=LoRA(rank=4, alpha=8.0))
    batch = make_batch(config)
    abstract = meta.unbox(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), batch["pixel_values"][:1], batch["input_ids"][:1]))["params"])
    tx = O.make_optimizer(lr_schedule=O.schedule("constant", 1e-3))

    def init(scheme, params=None):
        state = Trainer(model, tx, mesh, init_scheme=scheme).init(jax.random.PRNGKey(3), batch, params)
        return jax.device_get(state.params)

    hf = init("hf")
    flat_hf, flat_fan = traverse_util.flatten_dict(hf), traverse_util.flatten_dict(init("fan_in"))
    scaled = embeddings = 0
    for path, value in flat_hf.items():
        if path[-1] == "kernel" and "patch_embed" not in path:
            factor, scaled = value.shape[-2] ** -0.5 / 0.02, scaled + 1
        elif path[-1] in ("embedding", "pos_embed"):
            factor, embeddings = 1 / 0.02, embeddings + 1
        else:  # biases, norms, LoRA factors, prefix tokens, the patch embedding (LeCun already): untouched
            factor = 1.0
        np.testing.assert_allclose(flat_fan[path], value * factor, rtol=1e-6, err_msg=str(path))
    assert scaled > 20 and embeddings == 3  # tokens + the two towers' positions
    head = flat_fan[("language_model", "lm_head", "kernel")]  # [64, vocab]: std 1/8 from normal(0.02) draws
    assert abs(head.std() * head.shape[0] ** 0.5 - 1) < 0.05
    # Params handed in (a converted checkpoint) replace the fresh init as they are.
    loaded = init("fan_in", params=hf)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(hf)))
    with pytest.raises(ValueError, match="unknown init scheme 'xavier'"):
        rescale_init(hf, "xavier")
