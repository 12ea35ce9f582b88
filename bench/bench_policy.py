"""Actions per second of an OpenVLA-OFT policy (L1 head, chunk 8, one forward pass per chunk) against the
autoregressive OpenVLA (7 KV-cached greedy tokens per action) on the same backbone, batch 1, in one
process, through ``OpenVLAPolicy.predict_action`` (preprocessing included).

    python bench/bench_policy.py [--size tiny|mid] [--repeats 20]
    python bench/bench_policy.py --dtypes [--size towers] [--repeats 5]

``tiny`` is the demo's model (56px tiny towers, 2-layer 64-wide Llama); ``mid`` has 224px towers of
width 256 x 6 blocks and a 4-layer 512-wide Llama (vocab 32064), where the LLM weighs more; ``towers``
has the real DINOv2 ViT-L/14 + SigLIP So400m/14 towers at 224px and the tiny Llama (where the vision
towers dominate, as in the 7B model at batch 1 on a CPU). Random weights: speed does not depend on them.
Prints both rates and their ratio.

``--dtypes``: latency of the autoregressive predict at batch 1 in fp32 and in bf16 (bf16 operands,
fp32 accumulation) in the same process, their ratio, and whether both give the same greedy tokens.

    python bench/bench_policy.py --checkpoint workdir/demo/run_oft [--clients 16] [--requests 256]

``--checkpoint``: a trained policy (e.g. the demo's): latency at batch 1 in fp32, bf16, int8 and int4;
actions/s at batch 1 to 32; then ``ovla-jax serve`` started in its own process (as deployed), answering
``--requests`` official-protocol requests from one client at a time, then from ``--clients`` concurrent
clients (dynamic batching), twice each in alternation, every answer checked against ``predict_action``;
throughput ratio printed. The clients are a light asyncio load generator in this process (raw
HTTP/1.1 keep-alive connections), so that on a small machine they do not eat the server's CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np


def build(size: str):
    from ovla_jax.models.config import LlamaConfig, openvla_config, tiny_openvla_config

    if size == "tiny":
        base = tiny_openvla_config(image_size=56)
    elif size == "towers":
        base = openvla_config("dinosiglip-vit-so-224px", llm=tiny_openvla_config().llm, pad_token_id=320,
                              hf=json.dumps({"vision_backbone_id": "dinosiglip-vit-so-224px", "llm_backbone_id": "llama2-tiny"}))
    else:
        llm = LlamaConfig(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8)
        base = openvla_config("dinosiglip-vit-tiny", llm=llm, image_size=224,
                              vision_overrides=dict(width=256, depth=6, num_heads=4, mlp_dim=1024),
                              hf=json.dumps({"vision_backbone_id": "dinosiglip-vit-tiny", "llm_backbone_id": "llama2-tiny"}))
    oft = dataclasses.replace(base, action_head="l1", chunk=8, num_images=2, proprio_dim=3)
    return base, oft


def policy_for(config, seed: int = 0, dtype: str = "float32", params=None):
    from ovla_jax.checkpoints.hf import abstract_params
    from ovla_jax.policy import OpenVLAPolicy
    from ovla_jax.tokenizer import WordTokenizer

    rng = np.random.default_rng(seed)
    if params is None:
        params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.02).astype(np.float32), abstract_params(config))
    stats = {"toy": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]},
                     "proprio": {"q01": [0.0] * 3, "q99": [1.0] * 3, "min": [0.0] * 3, "max": [1.0] * 3}}}
    tok = WordTokenizer(config.tokenizer_vocab_size, config.n_action_bins) if config.tokenizer_vocab_size <= 4096 else None
    if tok is None:
        from ovla_jax.tokenizer import CharTokenizer

        tok = CharTokenizer(config.tokenizer_vocab_size, config.n_action_bins)
    return OpenVLAPolicy(config, params, tok, stats, max_length=160, dtype=dtype)


def actions_per_second(policy, repeats: int, chunked: bool) -> float:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (64, 64, 3), np.uint8)
    kw = dict(wrist_images=image, proprio=np.array([0.5, 0.5, 1.0], np.float32)) if chunked else {}
    policy.predict_action(image, "pick up the red block", **kw)  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        out = policy.predict_action(image, "pick up the red block", **kw)
    seconds = time.perf_counter() - start
    per_call = out.shape[0] if chunked else 1
    return repeats * per_call / seconds


def latency_by_dtype(config, repeats: int) -> None:
    """fp32 vs bf16 predict latency at batch 1 on the same weights; greedy tokens compared.

    The two policies are called in alternation and each reports its median call: on a shared or
    frequency-scaling CPU, back-to-back blocks of calls measure the machine's mood as much as the model."""
    from ovla_jax.checkpoints.hf import abstract_params

    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.02).astype(np.float32), abstract_params(config))
    image = np.random.default_rng(1).integers(0, 255, (224, 224, 3), np.uint8)
    policies, actions = {}, {}
    for dtype in ("float32", "bfloat16"):
        policies[dtype] = policy = policy_for(config, dtype=dtype, params=params)
        # compiles; an autoregressive policy's actions are its 7 greedy tokens' bin centers, so equal
        # actions mean equal tokens
        actions[dtype] = policy.predict_action(image, "pick up the red block")
    seconds = {dtype: [] for dtype in policies}
    for _ in range(repeats):
        for dtype, policy in policies.items():
            start = time.perf_counter()
            policy.predict_action(image, "pick up the red block")
            seconds[dtype].append(time.perf_counter() - start)
    median = {dtype: float(np.median(s)) for dtype, s in seconds.items()}
    same = bool(np.array_equal(actions["float32"], actions["bfloat16"]))
    print(f"predict latency at batch 1, median of {repeats} alternating calls each, {jax.devices()[0].platform}:")
    for dtype, s in seconds.items():
        print(f"  {dtype:9s} {median[dtype] * 1e3:9.1f} ms  (min {min(s) * 1e3:.1f}, max {max(s) * 1e3:.1f})")
    ratios = [b / f for f, b in zip(seconds["float32"], seconds["bfloat16"])]
    print(f"  ratio bf16 / fp32: {median['bfloat16'] / median['float32']:.2f}x (pairwise ratios "
          f"{min(ratios):.2f}..{max(ratios):.2f}); same greedy tokens: {same}")


def _observation(policy, rng, n):
    """n random camera frames (+ wrist, proprio when the model reads them) from the built-in tabletop."""
    from ovla_jax.sim.tabletop import Tabletop

    envs = [Tabletop(int(s)) for s in rng.integers(0, 10**6, n)]
    cfg = policy.config
    return (np.stack([e.render_scene() for e in envs]), [e.instruction for e in envs],
            np.stack([e.render() for e in envs]) if cfg.num_images > 1 else None,
            np.stack([e.state() for e in envs]) if cfg.proprio_dim else None)


def _timed(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def checkpoint_bench(path: str, clients: int, requests_total: int, repeats: int) -> None:
    from ovla_jax.policy import OpenVLAPolicy

    rng = np.random.default_rng(0)
    policies, latency = {}, {}
    print(f"{path}: latency at batch 1 ({repeats} calls each)")
    for label, kw in (("fp32", {}), ("bf16", dict(dtype="bfloat16")), ("int8", dict(quantize="int8")),
                      ("int4", dict(quantize="int4"))):
        policies[label] = policy = OpenVLAPolicy.from_pretrained(path, **kw)
        images, texts, wrist, state = _observation(policy, rng, 1)
        latency[label] = _timed(lambda: policy.predict_action(images, texts, wrist_images=wrist, proprio=state),
                                repeats)
        ratio = f"  ({latency[label] / latency['fp32']:.2f}x fp32)" if label != "fp32" else ""
        print(f"  {label}: {latency[label] * 1e3:8.1f} ms{ratio}")
    policy = policies["fp32"]
    per_call = policy.config.chunk if policy.config.parallel else 1
    print("actions/s by batch size (fp32, one call per batch):")
    rates = {}
    for batch in (1, 2, 4, 8, 16, 32):
        images, texts, wrist, state = _observation(policy, rng, batch)
        seconds = _timed(lambda: policy.predict_action(images, texts, wrist_images=wrist, proprio=state), repeats)
        rates[batch] = batch * per_call / seconds
        print(f"  batch {batch:2d}: {rates[batch]:9.1f} actions/s ({rates[batch] / rates[1]:.2f}x batch 1)")
    print(f"ovla-jax serve --max-batch {clients} in its own process, {requests_total} requests per round:")
    serve_bench(path, policy, clients, requests_total)


def _serve_process(path: str, max_batch: int):
    """``ovla-jax serve`` in its own process on a free local port, as deployed -> (process, port, log)."""
    import subprocess
    import sys
    import tempfile

    import requests

    from ovla_jax.serve.background import free_port

    port = free_port()
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "ovla_jax", "serve", "--checkpoint", path, "--host", "127.0.0.1",
                             "--port", str(port), "--max-batch", str(max_batch)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while True:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.seek(0)
            raise RuntimeError(f"ovla-jax serve did not come up:\n{log.read()[-3000:]}")
        try:
            if requests.get(url + "/healthz", timeout=1).ok:
                return proc, port, log
        except requests.ConnectionError:
            pass
        time.sleep(0.5)


async def _load(port: int, requests_bytes: list, connections: int) -> tuple[float, dict]:
    """Every request once over ``connections`` kept-alive HTTP/1.1 connections, each sending its next
    request when the last is answered (a light load generator, like wrk: a few microseconds of client
    work per request, so the server's cost is what is measured) -> (requests/s, answers by index)."""
    import asyncio

    import json_numpy

    todo = list(range(len(requests_bytes)))[::-1]
    answers = {}

    async def connection():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while todo:
            i = todo.pop()
            writer.write(requests_bytes[i])
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1]
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            body = await reader.readexactly(length)
            if status != b"200":
                raise RuntimeError(f"request {i}: HTTP {status.decode()}: {body[:300]!r}")
            answers[i] = json_numpy.loads(body)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    return len(requests_bytes) / (time.perf_counter() - start), answers


def serve_bench(path: str, policy, clients: int, requests_total: int) -> None:
    """Throughput of ``ovla-jax serve`` (its own process): one client at a time vs ``clients`` at once,
    official-protocol requests, every answer checked against ``predict_action``."""
    import asyncio

    import json_numpy

    rng = np.random.default_rng(1)
    key = next(iter(policy.norm_stats))
    images, texts, wrist, state = _observation(policy, rng, requests_total)
    encoded, want = [], []
    for i in range(requests_total):
        payload = {"image": images[i], "instruction": texts[i], "unnorm_key": key}
        if wrist is not None:
            payload["wrist_image"] = wrist[i]
        if state is not None:
            payload["proprio"] = state[i]
        body = json_numpy.dumps(payload).encode()
        encoded.append(b"POST /act HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        want.append(policy.predict_action(images[i], texts[i], key, wrist_images=None if wrist is None else wrist[i],
                                          proprio=None if state is None else state[i]))
    proc, port, log = _serve_process(path, clients)
    try:
        asyncio.run(_load(port, encoded[:4 * clients], clients))  # warm-up: connections, every batch size
        results = {}
        for label, connections in (("one client at a time", 1), (f"{clients} concurrent clients", clients)) * 2:
            rate, got = asyncio.run(_load(port, encoded, connections))
            worst = max(float(np.abs(got[i] - want[i]).max()) for i in range(requests_total))
            results.setdefault(label, []).append(rate)
            print(f"  server, {label}: {rate:8.2f} requests/s; largest difference from predict_action {worst:.2e}")
        one, many = (float(np.median(r)) for r in results.values())
        print(f"  ratio {clients} clients / one: {many / one:.2f}x (medians of 2 rounds, alternating)")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "mid", "towers"), default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--dtypes", action="store_true", help="fp32 vs bf16 latency (default size: towers)")
    p.add_argument("--checkpoint", help="a trained policy: latency by precision, batch sweep and the server")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=256)
    args = p.parse_args(argv)
    if args.checkpoint:
        checkpoint_bench(args.checkpoint, args.clients, args.requests, args.repeats or 10)
        return
    if args.dtypes:
        latency_by_dtype(build(args.size or "towers")[0], args.repeats or 7)
        return
    args.size, args.repeats = args.size or "tiny", args.repeats or 20
    base, oft = build(args.size)
    ar_rate = actions_per_second(policy_for(base), args.repeats, chunked=False)
    oft_rate = actions_per_second(policy_for(oft), args.repeats, chunked=True)
    print(f"{args.size} backbone, batch 1, {args.repeats} calls each, {jax.devices()[0].platform}:")
    print(f"  autoregressive OpenVLA (7 greedy tokens):        {ar_rate:8.2f} actions/s")
    print(f"  OpenVLA-OFT (L1 head, chunk 8, 2 images, proprio): {oft_rate:8.2f} actions/s")
    print(f"  ratio OFT / autoregressive: {oft_rate / ar_rate:.2f}x")


if __name__ == "__main__":
    main()
