"""``ovla-jax compile``: TPU slice names, analytic model FLOPs, and a real ahead-of-time compile of the
debug config's train step for a v5p slice on this CPU host (needs libtpu from the [tpu] extra)."""
import json
import os
import re

import numpy as np
import pytest

from ovla_jax.models.config import openvla_config, tiny_openvla_config
from ovla_jax.train.flops import example_flops
from ovla_jax.train.topology import parse_slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(ROOT, "configs", "train", "debug.py")


@pytest.mark.parametrize("name, topology, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-256", "v5p:4x4x8", 128), ("v5p-512", "v5p:4x8x8", 256),
    ("v4-8", "v4:2x2x1", 4), ("v4-128", "v4:4x4x4", 64), ("v5e-64", "v5e:8x8", 64),
    ("v5litepod-16", "v5e:4x4", 16), ("v6e-256", "v6e:16x16", 256), ("v5p:4x4x8", "v5p:4x4x8", 128)])
def test_slice_names_follow_cloud_tpu_accelerator_types(name, topology, chips):
    s = parse_slice(name)
    assert s.topology_name == topology and s.chips == chips


@pytest.mark.parametrize("name, message", [("v5p-6", "not a power of two"), ("v4-7", "2 cores per chip"),
                                           ("tpu-9", "unknown TPU topology"), ("v5p:2x2", "3 dimensions")])
def test_bad_slice_names_say_why(name, message):
    with pytest.raises(ValueError, match=message):
        parse_slice(name)


def test_model_flops_are_6nt_for_full_training_and_follow_the_trainable_parts():
    cfg = openvla_config()
    full = example_flops(cfg, 96, lambda p: True)
    assert full.train == pytest.approx(3 * full.forward)
    llm = cfg.llm
    per_layer = 4 * llm.hidden_size ** 2 + 3 * llm.hidden_size * llm.intermediate_size  # q, k, v, o + SwiGLU
    seq = 256 + 96
    want_llm = 2 * per_layer * llm.num_layers * seq + 4 * seq ** 2 * llm.hidden_size * llm.num_layers
    assert full.by_component["language_model"] == pytest.approx(want_llm + 2 * llm.hidden_size * llm.vocab_size * 8)
    # DINOv2 runs 23 of its 24 blocks over 261 tokens (256 patches + cls + 4 registers)
    dino = cfg.vision[0]
    block = 4 * dino.width ** 2 + 2 * dino.width * dino.mlp_dim
    assert dino.feature_block + 1 == 23 and full.by_component["vision_backbone"] > 2 * block * 23 * 261
    frozen = example_flops(cfg, 96, lambda p: p.startswith(("projector/", "language_model/")))
    assert frozen.forward == pytest.approx(full.forward)
    assert frozen.train < full.train - 2 * full.by_component["vision_backbone"] * 0.99  # no vision backward
    assert 1e13 < full.train < 2e13  # ~6 x 7.5B params x 350 tokens


def test_compile_reports_that_a_program_does_not_fit(monkeypatch, capsys):
    """The fit check against a chip's HBM, with the chip shrunk to 1 MiB (the real compile is cheap)."""
    pytest.importorskip("libtpu")
    import dataclasses

    from ovla_jax.train import compile_cli, topology

    monkeypatch.setitem(topology.CHIPS, "v5p", dataclasses.replace(topology.CHIPS["v5p"], hbm_bytes=2 ** 20))
    code = compile_cli.run(["--config", DEBUG, "--topology", "v5p-8", "--estimate", "none"])
    err = capsys.readouterr().err
    assert code == 1 and "does not fit" in err and re.search(r"short by [\d.]+ GiB", err), err


def test_unusable_cost_model_time_falls_back_to_the_roofline(monkeypatch, tmp_path, capsys):
    """libtpu's v4 and v5e cost models give negative step times for the 7B step: the report says so and
    bounds the step by the roofline of the FLOPs and bytes XLA counted, labelled as a bound."""
    pytest.importorskip("libtpu")
    import dataclasses

    from ovla_jax.train import aot, compile_cli, topology

    real = aot._compiled
    monkeypatch.setattr(aot, "_compiled", lambda *a: dataclasses.replace(real(*a), xla_seconds=-137.9))
    out = tmp_path / "r.json"
    assert compile_cli.run(["--config", DEBUG, "--topology", "v5e-4", "--config.remat=full",
                            f"--json={out}"]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    chip = topology.CHIPS["v5e"]
    assert r["xla_step_seconds_unusable"] == -137.9 and "xla_step_seconds" not in r and "mfu" not in r
    per_chip_flops = r["xla_flops_per_step"] / r["chips"]
    assert per_chip_flops > 0 and r["xla_bytes_per_chip"] > 0
    assert r["roofline_step_seconds"] == pytest.approx(
        max(per_chip_flops / chip.peak_bf16, r["xla_bytes_per_chip"] / chip.hbm_bandwidth))
    assert r["roofline_mfu"] == pytest.approx(
        r["model_flops_per_step"] / (r["chips"] * chip.peak_bf16 * r["roofline_step_seconds"]))
    assert "unavailable" in text and "roofline" in text and "MFU           <=" in text


def test_the_fit_hint_leaves_out_what_the_config_already_does():
    from ml_collections import config_dict

    from ovla_jax.train.compile_cli import _hint

    assert "remat=full" in _hint(False, config_dict.ConfigDict({"remat": "dots", "mode": "lora",
                                                                "frozen_quantize": "none"}))
    done = _hint(False, config_dict.ConfigDict({"remat": "full", "mode": "lora", "frozen_quantize": "int8"}))
    assert "remat=full" not in done and "frozen_quantize=int4" in done
    full = _hint(False, config_dict.ConfigDict({"remat": "full", "mode": "full", "frozen_quantize": "none"}))
    assert "frozen_quantize" not in full and "fsdp" in full


@pytest.fixture(scope="module")
def tpu():
    pytest.importorskip("libtpu")
    return True


@pytest.mark.slow  # minutes on 2 cores: CI runs it after the default suite
def test_debug_step_compiles_for_a_v5p_slice_and_reports(tpu, tmp_path, capsys):
    from ovla_jax.cli import main

    out = tmp_path / "report.json"
    code = main(["compile", "--config", DEBUG, "--topology", "v5p-8", "--config.batch_size=32",
                 "--config.scan_layers=true", "--estimate", "shallow", f"--json={out}"])
    text = capsys.readouterr().out
    assert code == 0, text
    r = json.loads(out.read_text())
    assert r["fits"] and r["chips"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    mem = r["memory_gib_per_chip"]
    assert mem["total"] > 0 and mem["total"] == pytest.approx(
        mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["code"])
    assert r["compile_seconds"] > 0 and 0 < r["mfu"] < 1 and r["xla_step_seconds"] > 0
    assert r["model_flops_per_step"] == pytest.approx(32 * r["model_flops_per_example"])
    for line in ("memory/chip", "model FLOPs", "step time", "MFU", "throughput"):
        assert line in text
    # The shallow extrapolation agrees with the full unrolled compile it stands in for.
    exact = tmp_path / "exact.json"
    assert main(["compile", "--config", DEBUG, "--topology", "v5p-8", "--config.batch_size=32",
                 "--config.scan_layers=true", "--estimate", "unrolled", f"--json={exact}"]) == 0
    e = json.loads(exact.read_text())
    assert e["unrolled_compile_seconds"] > 0
    assert np.isclose(r["xla_flops_per_step"], e["xla_flops_per_step"], rtol=0.05)
    assert np.isclose(r["xla_step_seconds"], e["xla_step_seconds"], rtol=0.25)


def test_compile_rejects_bad_arguments(capsys):
    from ovla_jax.cli import main

    assert main(["compile", "--config", DEBUG]) == 2
    assert "--topology is required" in capsys.readouterr().err
    assert main(["compile", "--config", DEBUG, "--topology", "v9-8"]) == 2
    assert "unknown TPU topology" in capsys.readouterr().err
    assert main(["compile", "--config", DEBUG, "--topology", "v5p-8", "--config.mesh.tensor=3"]) == 2
    assert "mesh" in capsys.readouterr().err


def test_tiny_config_flops_count_lora_adapters():
    from ovla_jax.models.lora import LoRA

    cfg = tiny_openvla_config()
    plain = example_flops(cfg, 16, lambda p: True)
    lora = example_flops(cfg, 16, lambda p: p.endswith(("lora_a", "lora_b")), lora=LoRA(rank=4))
    assert lora.forward > plain.forward  # the adapters' matmuls run too
    assert lora.weight_grads < 0.2 * plain.weight_grads  # only adapters get weight gradients
