"""The one weight loader: every checkpoint kind into every final form (dtype, int8 / int4, per-layer or
scanned), exactly what casting / quantizing the whole tree on the host gives; peak memory of a fresh
process = final weights + one tensor (measured, not inferred); a target that cannot fit fails first."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from ovla_jax import quantize as Q
from ovla_jax.checkpoints import hf, loader
from ovla_jax.checkpoints.errors import CheckpointError
from ovla_jax.checkpoints.jax_format import save_jax_checkpoint
from ovla_jax.models.config import LlamaConfig
from ovla_jax.models.scan import stack_layers
from tests.conftest import tiny_config
from tests.helpers import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    config = tiny_config()
    params = random_params(config, seed=5)
    root = tmp_path_factory.mktemp("ckpts")
    hf.save_hf_checkpoint(str(root / "hf"), config, params, {}, dtype="bfloat16")
    save_jax_checkpoint(str(root / "jax"), config, params)
    return config, params, root


@pytest.mark.parametrize("kind, dtype, quantize, scan", [
    ("hf", "float32", "none", False), ("hf", "bfloat16", "none", True), ("hf", "bfloat16", "int8", True),
    ("hf", "float32", "int4", False), ("jax", "bfloat16", "int8", False), ("jax", "float32", "int4", True)])
def test_every_checkpoint_loads_into_every_form_as_the_whole_tree_would_convert(checkpoints, kind, dtype, quantize,
                                                                                 scan):
    config, params, root = checkpoints
    got = loader.load(str(root / kind), dtype=dtype, quantize=quantize, scan=scan)
    stored = hf.load_checkpoint(str(root / kind), hf.LAYOUTS[kind])[1]  # the host path: whole tree, stored dtype
    want = jax.tree.map(lambda a: np.asarray(a, np.float32), stored)
    # Quantized kernels come from the stored values; every other float is cast to the dtype.
    want = Q.quantize_params(stack_layers(want) if scan else want, quantize)
    want = jax.tree.map(lambda a: a if Q.is_quantized(a) else np.asarray(a).astype(dtype), want, is_leaf=Q.is_quantized)
    got_flat, want_flat = _flat(got.params), _flat(want)
    assert got_flat.keys() == want_flat.keys()
    for path in want_flat:
        a, b = jax.tree.leaves(got_flat[path]), jax.tree.leaves(want_flat[path])
        assert type(got_flat[path]) is type(want_flat[path]), path
        assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b)), path
    kinds = {type(x).__name__ for x in jax.tree.leaves(got.params, is_leaf=Q.is_quantized)}
    assert ("Int8Weight" in kinds) == (quantize == "int8") and ("Int4Weight" in kinds) == (quantize == "int4")
    assert got.scan == scan


def test_a_target_that_cannot_fit_fails_before_reading_and_names_what_it_needs(checkpoints, monkeypatch):
    from ovla_jax.checkpoints import memory

    _, _, root = checkpoints
    source = loader.open_source(str(root / "hf"))
    reads = []
    monkeypatch.setattr(source, "read", lambda entry: reads.append(entry) or 1 / 0)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 1000)
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    from ovla_jax.checkpoints.sharded import place

    target = loader.model_target(source.config, dtype="bfloat16")
    with pytest.raises(memory.InsufficientMemory, match=r"need 0\.\d+ GiB on this host .* has 0\.00 GiB available"):
        place(source, target)
    assert not reads  # nothing was read
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    with pytest.raises(ZeroDivisionError):  # the check is skipped: it starts reading
        place(source, target)


def test_bad_sources_name_the_problem(checkpoints, tmp_path):
    _, _, root = checkpoints
    with pytest.raises(CheckpointError, match="not found"):
        loader.open_source(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="not a train checkpoint"):
        loader.open_source(str(root / "hf"), step=3)
    with pytest.raises(ValueError, match="quantize 'int3'"):
        loader.model_target(tiny_config(), quantize="int3")


MID = LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16)
# VmHWM, the peak RSS of this process's own memory map (exec starts a new one); getrusage's ru_maxrss of
# a forked child starts from its parent's size at the fork.
PROBE = r"""
import json, sys
import jax, numpy as np
jax.numpy.zeros(1).block_until_ready()  # the backend, before the baseline
from ovla_jax.checkpoints import loader
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
before = status("VmRSS")
got = loader.load(sys.argv[1], dtype=sys.argv[2], quantize=sys.argv[3], scan=True)
jax.block_until_ready(got.params)
final = sum(x.nbytes for x in jax.tree.leaves(got.params))
print(json.dumps({"before": before, "peak": status("VmHWM"), "final": final}))
"""


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory):
    """A ~220M-param OpenVLA (Llama of width 1024 x 12 layers, full 32064 vocab) in the HF layout, bf16."""
    import ml_dtypes

    config = tiny_config(llm=MID)
    path = str(tmp_path_factory.mktemp("mid") / "hf")
    rng = np.random.default_rng(0)
    entries = hf.name_map(config)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    hf.write_checkpoint(path, hf.HF, config, {}, entries, {e.path: bf16 for e in entries},
                        lambda e: (rng.standard_normal(e.jax_shape, np.float32) * 0.02).astype(bf16))
    largest = max(int(np.prod(e.jax_shape)) for e in entries)
    return path, sum(int(np.prod(e.jax_shape)) for e in entries), largest


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", "none"), ("bfloat16", "int8"), ("float32", "none")])
def test_streaming_load_peak_is_the_final_weights_plus_one_tensor(mid_checkpoint, dtype, quantize):
    """Peak RSS growth of a fresh process loading the checkpoint (scanned stacks, quantized or not) stays
    within the final weights + the largest tensor in fp32 (read, then converted) + 192 MiB for the
    runtime's own working memory (XLA compiles a small program per tensor shape; with allocator slack
    that took ~130 MiB here at every precision). Reading the whole tree first needs 2 (bf16) or 4 (fp32,
    as the policy did) bytes a parameter on top: more than the bound allows."""
    path, n_params, largest = mid_checkpoint
    out = subprocess.run([sys.executable, "-c", PROBE, path, dtype, quantize], capture_output=True, text=True,
                         env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth, margin = r["peak"] - r["before"], 192 * 2 ** 20
    bound = r["final"] + 4 * largest + margin
    print(f"{dtype}/{quantize}: final {r['final'] / 2**20:.0f} MiB, growth {growth / 2**20:.0f} MiB, bound "
          f"{bound / 2**20:.0f} MiB; a float32 copy first would need {(r['final'] + 4 * n_params) / 2**20:.0f} MiB")
    assert growth <= bound
    assert bound < r["final"] + 2 * n_params  # the bound tells streaming from reading the whole tree first
