"""What ``ovla-jax demo`` runs until the simulated-task demo lands (issue 5): build a tiny OpenVLA,
export it to the HF PyTorch layout, convert it back through the ovla-jax format, and check that the
reloaded model decodes the same 7 action tokens. Exercises model, KV-cache decoding and converter."""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import meta

from ovla_jax import actions
from ovla_jax.checkpoints import hf, jax_format
from ovla_jax.models.config import tiny_openvla_config
from ovla_jax.models.openvla import OpenVLA, greedy_decode


def run(workdir: str) -> int:
    start = time.time()
    os.makedirs(workdir, exist_ok=True)
    config = tiny_openvla_config()
    model = OpenVLA(config)
    size = config.vision[0].image_size
    pixels = jax.random.uniform(jax.random.PRNGKey(1), (2, size, size, 6), minval=-1, maxval=1)
    ids = jnp.array([[1, 17, 29, 40, 51], [1, 18, 30, 41, 52]], jnp.int32)
    params = meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), pixels, ids)["params"])
    tokens, _ = greedy_decode(model, params, pixels, ids, num_tokens=7)

    hf_dir, jax_dir, back_dir = (os.path.join(workdir, n) for n in ("tiny-hf", "tiny-jax", "tiny-hf-roundtrip"))
    host = jax.tree_util.tree_map(np.asarray, params)
    hf.save_hf_checkpoint(hf_dir, config, host, {}, overwrite=True)
    _, loaded, _ = hf.load_hf_checkpoint(hf_dir)
    jax_format.save_jax_checkpoint(jax_dir, config, loaded, {}, carry_from=hf_dir, overwrite=True)
    config2, reloaded, _ = jax_format.load_jax_checkpoint(jax_dir)
    hf.save_hf_checkpoint(back_dir, config2, reloaded, {}, overwrite=True)
    tokens2, _ = greedy_decode(OpenVLA(config2), reloaded, pixels, ids, num_tokens=7)

    same = bool(np.array_equal(np.asarray(tokens), np.asarray(tokens2)))
    decoded = actions.decode_action_tokens(np.asarray(tokens2), vocab_size=config.tokenizer_vocab_size)
    print(f"tiny OpenVLA: {sum(x.size for x in jax.tree_util.tree_leaves(params)):,} params; "
          f"HF -> ovla-jax -> HF round trip in {workdir}")
    print(f"greedy action tokens before/after conversion identical: {same}\n{np.asarray(tokens2)}")
    print(f"as normalized actions:\n{np.round(decoded, 3)}")
    print(f"done in {time.time() - start:.1f}s. The simulated-task training demo arrives with issue 5.")
    return 0 if same else 1
