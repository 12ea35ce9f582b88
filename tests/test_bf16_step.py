"""bf16 training: every product of the compiled step on bf16 operands, gradients that agree with fp32
autodiff, and the fused AdamW equal to optax's chain.

Tolerances come from the numerics: a bf16 operand carries a relative rounding error of at most 2^-9;
a product of two rounded operands (and a cotangent rounded once more) is off by ~3 x 2^-9 per term, and
sums of terms with random signs do not grow that relative error. 2e-2 of the result's scale leaves
a factor ~3 of margin. The optimizer is fp32 throughout: 1e-6 relative (a few ulps after 10 steps).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ovla_jax import sharding
from ovla_jax.models import layers as L
from ovla_jax.models.config import tiny_openvla_config
from ovla_jax.models.openvla import OpenVLA
from ovla_jax.train import optimizer as O
from ovla_jax.train.step import Trainer
from ovla_jax.data.batch import BatchTransform
from ovla_jax.tokenizer import CharTokenizer

BF16_TOL = 2e-2


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("w_dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_gradients_match_fp32_autodiff(w_dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 37, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((48, 40)) / 7, w_dtype)
    g = jnp.asarray(rng.standard_normal((2, 37, 40)), jnp.float32)

    def low(x, w):
        return jnp.sum(L.matmul(x.astype(jnp.bfloat16), w) * g)

    def ref(x, w):
        return jnp.sum(jnp.einsum("bti,io->bto", x, w.astype(jnp.float32)) * g)

    gx, gw = jax.grad(low, argnums=(0, 1))(x, w)
    rx, rw = jax.grad(ref, argnums=(0, 1))(x, w)
    assert gw.dtype == w_dtype  # an fp32 master weight gets an fp32 gradient
    assert _rel(gx, rx) < BF16_TOL and _rel(gw, rw) < BF16_TOL


def test_low_precision_attention_gradients_match_fp32():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 9, 4, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.uniform(size=(2, 1, 9, 9)) > 0.2) | jnp.eye(9, dtype=bool)
    g = jnp.asarray(rng.standard_normal((2, 9, 4, 8)), jnp.float32)

    def loss(q, k, v, dtype):
        out = L.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask)
        return jnp.sum(out.astype(jnp.float32) * g)

    low = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, jnp.bfloat16)
    ref = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, jnp.float32)
    for a, b in zip(low, ref):
        assert _rel(a, b) < BF16_TOL


def _dot_operand_types(hlo_text: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot_general in a StableHLO module."""
    return re.findall(r"stablehlo\.dot_general[^\n]*\(tensor<[^>]*?x?(\w+)>, tensor<[^>]*?x?(\w+)>\)", hlo_text)


def _batch(config, n=2, seed=0):
    rng = np.random.default_rng(seed)
    bt = BatchTransform(CharTokenizer(vocab_size=config.tokenizer_vocab_size), max_length=96)
    rows = [bt.example("push the red block", a) for a in rng.uniform(-1, 1, (n, 7))]
    size = config.vision[0].image_size
    return {"input_ids": np.stack([r[0] for r in rows]), "attention_mask": np.stack([r[1] for r in rows]),
            "labels": np.stack([r[2] for r in rows]),
            "pixel_values": rng.uniform(-1, 1, (n, size, size, 6)).astype(np.float32),
            "dataset_id": np.zeros(n, np.int32)}


def test_bf16_train_step_has_no_fp32_products():
    """The lowered bf16 step (forward, both backward products, optimizer) holds only bf16 x bf16 dots;
    and it compiles and runs (XLA:CPU fails at run time on bf16 dots in forms its kernels lack)."""
    config = tiny_openvla_config()
    model = OpenVLA(config, dtype=jnp.bfloat16)
    batch = _batch(config)
    mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
    trainer = Trainer(model, O.make_optimizer(lr_schedule=O.schedule("constant", 1e-3)), mesh)
    state = trainer.init(jax.random.PRNGKey(0), batch)
    step = trainer.compile_step(sharding.batch_sharding(mesh))
    text = step.lower(state, batch).as_text()
    types = _dot_operand_types(text)
    assert len(types) > 20, "no dots found: the HLO pattern no longer matches"
    fp32 = [t for t in types if "f32" in t]
    assert not fp32, f"{len(fp32)} of {len(types)} products of the bf16 step have fp32 operands"
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))


def test_fused_adamw_matches_optax_chain():
    sched = O.schedule("warmup_cosine", 1e-2, total_steps=20, warmup_steps=3)
    kw = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, clip_norm=1.0)
    fused, reference = O.fused_adamw(sched, **kw), O.reference_adamw(sched, **kw)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((5, 7)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(7), jnp.float32)}
    p_fused, p_ref = params, params
    s_fused, s_ref = fused.init(params), reference.init(params)
    assert jax.tree.structure(s_fused) == jax.tree.structure(s_ref)  # checkpoints interchange
    for i in range(10):  # alternately clipped (norm ~ 3 sqrt(42)) and not (norm ~ 0.1 sqrt(42) < 1)
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * (3 if i % 2 else 0.1), jnp.float32),
                         params)
        u, s_fused = fused.update(g, s_fused, p_fused)
        r, s_ref = reference.update(g, s_ref, p_ref)
        p_fused, p_ref = optax.apply_updates(p_fused, u), optax.apply_updates(p_ref, r)
    for key in params:
        assert _rel(p_fused[key], p_ref[key]) < 1e-6
    assert _rel(s_fused[1][0].nu["w"], s_ref[1][0].nu["w"]) < 1e-6
