"""``ovla-jax serve``: the official REST client (requests + json_numpy) and openpi's websocket client get
exactly ``OpenVLAPolicy.predict_action``'s actions; dynamic batching runs concurrent requests as one call;
hundreds of malformed requests of many kinds each get a 4xx / error frame naming the problem while the
good ones mixed in are answered correctly, with no restart."""
import concurrent.futures
import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
json_numpy = pytest.importorskip("json_numpy")
requests = pytest.importorskip("requests")

from ovla_jax.checkpoints.hf import abstract_params  # noqa: E402
from ovla_jax.models.config import tiny_openvla_config  # noqa: E402
from ovla_jax.policy import OpenVLAPolicy  # noqa: E402
from ovla_jax.serve import wire  # noqa: E402
from ovla_jax.serve.app import ObservationKeys  # noqa: E402
from ovla_jax.serve.background import BackgroundServer  # noqa: E402
from ovla_jax.serve.batcher import buckets  # noqa: E402
from ovla_jax.tokenizer import WordTokenizer  # noqa: E402

STATS = {"toy": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]},
                 "proprio": {"q01": [0.0] * 3, "q99": [1.0] * 3, "min": [0.0] * 3, "max": [1.0] * 3}},
         "other": {"action": {"q01": [-2.0] * 7, "q99": [2.0] * 7, "mask": [True] * 6 + [False]},
                   "proprio": {"q01": [0.0] * 3, "q99": [1.0] * 3, "min": [0.0] * 3, "max": [1.0] * 3}}}


def _policy(**oft):
    import jax

    config = dataclasses.replace(tiny_openvla_config(image_size=56), **oft)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.5).astype(np.float32), abstract_params(config))
    tok = WordTokenizer(config.tokenizer_vocab_size, config.n_action_bins)
    return OpenVLAPolicy(config, params, tok, STATS, max_length=96 if oft else 32)


def Server(policy, **kw):
    return BackgroundServer(policy, **{"max_batch": 4, "max_wait_ms": 20.0, "unnorm_key": None, **kw})


@pytest.fixture(scope="module")
def ar_policy():
    return _policy()


@pytest.fixture(scope="module")
def oft_policy():
    return _policy(action_head="l1", chunk=4, num_images=2, proprio_dim=3)


def _images(n, seed=0, size=64):
    return np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), np.uint8)


def test_buckets_cover_every_batch_size():
    assert buckets(1) == [1] and buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="max_batch"):
        buckets(0)


OFFICIAL_CLIENT = """
import json, sys
sys.modules["simplejson"] = None  # requests prefers simplejson when installed; the patch covers the json module
import numpy as np
import json_numpy
json_numpy.patch()  # as the official client does: json.loads / dumps understand numpy arrays
import requests

url, images_path, out_path = sys.argv[1:]
images = np.load(images_path)
out = []
for i, key in enumerate(("toy", "other", "toy")):
    payload = {"image": images[i], "instruction": f"pick up the block {i}", "unnorm_key": key}
    action = requests.post(url + "/act", json=payload).json()
    encoded = requests.post(url + "/act", json={"encoded": json.dumps(payload)}).json()
    assert isinstance(action, np.ndarray), type(action)
    out += [action, encoded]
np.save(out_path, np.stack(out))
"""


def test_official_client_gets_predict_actions_also_double_encoded(ar_policy, tmp_path):
    import subprocess
    import sys

    images = _images(3)
    np.save(tmp_path / "images.npy", images)
    with Server(ar_policy) as srv:
        meta = requests.get(srv.url + "/metadata").json()
        assert meta["unnorm_keys"] == ["other", "toy"] and meta["action_dim"] == 7 and meta["chunk"] == 1
        assert requests.get(srv.url + "/healthz").json()["status"] == "ok"
        # The client runs in its own process: json_numpy.patch() rewires the json module process-wide.
        done = subprocess.run([sys.executable, "-c", OFFICIAL_CLIENT, srv.url, str(tmp_path / "images.npy"),
                               str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    got = np.load(tmp_path / "out.npy")
    for i, key in enumerate(("toy", "other", "toy")):
        want = ar_policy.predict_action(images[i], f"pick up the block {i}", key)
        assert got[2 * i].shape == (7,)
        np.testing.assert_array_equal(got[2 * i], want)
        np.testing.assert_array_equal(got[2 * i + 1], want)


def test_openpi_client_gets_predict_chunks(oft_policy):
    ws_client = pytest.importorskip("openpi_client.websocket_client_policy")
    images, wrist = _images(2, 1), _images(2, 2)
    states = np.array([[0.2, 0.3, 1.0], [0.7, 0.1, 0.0]], np.float32)
    with Server(oft_policy) as srv:
        client = ws_client.WebsocketClientPolicy("127.0.0.1", srv.port)
        meta = client.get_server_metadata()
        assert meta["chunk"] == 4 and meta["num_images"] == 2 and meta["proprio_dim"] == 3
        for i in range(2):
            out = client.infer({"observation/image": images[i], "observation/wrist_image": wrist[i],
                                "observation/state": states[i], "prompt": "put the red block on the plate",
                                "unnorm_key": "toy"})
            want = oft_policy.predict_action(images[i], "put the red block on the plate", "toy",
                                             wrist_images=wrist[i], proprio=states[i])
            assert out["actions"].shape == (4, 7)
            np.testing.assert_allclose(out["actions"], want, rtol=0, atol=1e-5)
        with pytest.raises(RuntimeError, match="observation/state|proprio"):
            client.infer({"observation/image": images[0], "observation/wrist_image": wrist[0], "prompt": "go",
                          "unnorm_key": "toy"})
        out = client.infer({"observation/image": images[0], "observation/wrist_image": wrist[0],  # still serving
                            "observation/state": states[0], "prompt": "go", "unnorm_key": "toy"})
        assert out["actions"].shape == (4, 7)


def test_observation_keys_are_configurable():
    keys = ObservationKeys.parse("image=cam/high,instruction=task")
    assert keys.image == "cam/high" and keys.instruction == "task" and keys.proprio == "observation/state"
    with pytest.raises(ValueError, match="FIELD=KEY"):
        ObservationKeys.parse("camera=cam/high")


def _bad_requests(image):
    """(name, how to send it): at least ten kinds of malformed request."""
    good = {"image": image, "instruction": "pick up the block", "unnorm_key": "toy"}
    dumps = json_numpy.dumps
    return [
        ("not json", dict(data=b"{not json", headers={"content-type": "application/json"})),
        ("json list", dict(data=dumps([1, 2, 3]))),
        ("missing image", dict(data=dumps({"instruction": "go", "unnorm_key": "toy"}))),
        ("missing instruction", dict(data=dumps({"image": image, "unnorm_key": "toy"}))),
        ("float image", dict(data=dumps({**good, "image": image.astype(np.float32)}))),
        ("gray image", dict(data=dumps({**good, "image": image[..., 0]}))),
        ("4 channels", dict(data=dumps({**good, "image": np.zeros((8, 8, 4), np.uint8)}))),
        ("image as list", dict(data=json.dumps({**good, "image": [[1, 2, 3]]}))),
        ("empty instruction", dict(data=dumps({**good, "instruction": "  "}))),
        ("numeric instruction", dict(data=dumps({**good, "instruction": 7}))),
        ("unknown unnorm_key", dict(data=dumps({**good, "unnorm_key": "nope"}))),
        ("no unnorm_key, two datasets", dict(data=dumps({"image": image, "instruction": "go"}))),
        ("unknown field", dict(data=dumps({**good, "gripper": 1}))),
        ("encoded not a string", dict(data=dumps({"encoded": 5}))),
        ("encoded bad json", dict(data=dumps({"encoded": "{oops"}))),
        ("wrist image for a 1-camera model", dict(data=dumps({**good, "wrist_image": image}))),
        ("instruction too long", dict(data=dumps({**good, "instruction": "go " * 200}))),
        ("oversized body", dict(data=b"x" * (2 << 20))),
        ("corrupt numpy object", dict(data=json.dumps({**good, "image": {"__numpy__": "!!", "dtype": "<u1",
                                                                           "shape": [2, 2, 3]}}))),
    ]


def test_malformed_requests_get_4xx_and_good_ones_mixed_in_are_answered(ar_policy):
    image = _images(1, 5)[0]
    want = ar_policy.predict_action(image, "pick up the block", "toy")
    bad = _bad_requests(image)
    assert len(bad) >= 10
    good_body = json_numpy.dumps({"image": image, "instruction": "pick up the block", "unnorm_key": "toy"})
    jobs = [("good", dict(data=good_body)) if i % 5 == 4 else bad[i % len(bad)] for i in range(640)]
    n_bad = sum(name != "good" for name, _ in jobs)
    assert n_bad >= 500
    with Server(ar_policy, max_body_bytes=1 << 20) as srv:
        def send(job):
            name, kw = job
            r = requests.post(srv.url + "/act", timeout=120, **kw)
            return name, r.status_code, r.text

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(send, jobs))
        for name, status, text in results:
            if name == "good":
                assert status == 200, text
                np.testing.assert_array_equal(json_numpy.loads(text), want)
            else:
                assert 400 <= status < 500, (name, status, text)
                message = json.loads(text)["error"]
                assert len(message) > 10, (name, message)
        assert requests.get(srv.url + "/healthz").json()["status"] == "ok"  # still the same process, serving
        kinds = {name: json.loads(text)["error"] for name, status, text in results if name != "good"}
    assert "unnorm_key" in kinds["unknown unnorm_key"] and "image" in kinds["float image"]
    assert "uint8" in kinds["float image"] and "[H, W, 3]" in kinds["gray image"]
    assert "over the limit" in kinds["oversized body"] and "JSON" in kinds["not json"]


def test_concurrent_requests_share_batched_calls(ar_policy):
    images = _images(8, 9)
    with Server(ar_policy, max_batch=8, max_wait_ms=200.0) as srv:
        def send(i):
            body = json_numpy.dumps({"image": images[i], "instruction": f"task {i}", "unnorm_key": "toy"})
            return json_numpy.loads(requests.post(srv.url + "/act", data=body, timeout=120).text)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(send, range(8)))
        calls = srv.app.state.batcher.calls
    for i in range(8):
        np.testing.assert_array_equal(got[i], ar_policy.predict_action(images[i], f"task {i}", "toy"))
    assert calls < 8  # some requests rode together in one model call


def test_msgpack_numpy_round_trips_and_refuses_object_arrays():
    value = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": np.float32(2.5), "c": "text"}
    back = wire.msgpack_loads(wire.msgpack_dumps(value))
    np.testing.assert_array_equal(back["a"], value["a"]) and back["a"].dtype == np.int16
    assert back["b"] == np.float32(2.5) and back["c"] == "text"
    with pytest.raises(TypeError):
        wire.msgpack_dumps({"x": np.array([object()])})
    with pytest.raises(Exception, match="msgpack"):
        wire.msgpack_loads(b"\xc1\xc1")


def test_serve_cli_loads_a_checkpoint_compiles_every_bucket_and_names_bad_arguments(ar_policy, tmp_path, capsys):
    import argparse

    from ovla_jax.checkpoints.jax_format import save_jax_checkpoint
    from ovla_jax.cli import main
    from ovla_jax.serve import cli as serve_cli

    save_jax_checkpoint(str(tmp_path / "ckpt"), ar_policy.config, ar_policy.params, STATS)
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    args = p.parse_args(["--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", "words", "--max-length", "32",
                         "--max-batch", "3", "--unnorm-key", "toy", "--dtype", "bfloat16"])
    lines = []
    app, policy = serve_cli.build(args, progress=lines.append)
    assert [line.split(" in ")[0] for line in lines[1:]] == ["compiled batch 1", "compiled batch 2", "compiled batch 3"]
    assert policy.dtype == "bfloat16" and app.state.batcher.sizes == [1, 2, 3]
    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", "words", "--obs-keys", "camera=x"]) == 2
    assert "FIELD=KEY" in capsys.readouterr().err


def test_policy_preprocesses_a_batch_exactly_as_the_pipeline_does_each_image(ar_policy):
    import tensorflow as tf

    from ovla_jax.data import frames as F

    images = _images(4, 11, size=80)  # resized to the model's 56px
    one_by_one = np.stack([F.pixel_values(F.resize(tf.constant(im), 56), ar_policy.towers).numpy() for im in images])
    np.testing.assert_array_equal(ar_policy.pixel_values(images), one_by_one)
