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
actions/s at batch 1 to 32; then ``ovla-jax serve``'s app on uvicorn in this process, answering
``--requests`` official-protocol requests from one client at a time, then from ``--clients`` concurrent
clients (dynamic batching), every answer checked against ``predict_action``; throughput ratio printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import threading
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
        seconds = _timed(lambda: policy.predict_action(images, texts, wrist_images=wrist, proprio=state), max(2, repeats // 2))
        rates[batch] = batch * per_call / seconds
        print(f"  batch {batch:2d}: {rates[batch]:9.1f} actions/s ({rates[batch] / rates[1]:.2f}x batch 1)")
    serve_bench(policy, clients, requests_total)


def serve_bench(policy, clients: int, requests_total: int) -> None:
    """Throughput of the server: one client at a time vs ``clients`` at once, answers checked."""
    import concurrent.futures

    import json_numpy
    import requests

    from ovla_jax.serve.background import BackgroundServer

    rng = np.random.default_rng(1)
    key = next(iter(policy.norm_stats))
    images, texts, wrist, state = _observation(policy, rng, requests_total)
    bodies = []
    for i in range(requests_total):
        payload = {"image": images[i], "instruction": texts[i], "unnorm_key": key}
        if wrist is not None:
            payload["wrist_image"] = wrist[i]
        if state is not None:
            payload["proprio"] = state[i]
        bodies.append(json_numpy.dumps(payload))
    want = [policy.predict_action(images[i], texts[i], key, wrist_images=None if wrist is None else wrist[i],
                                  proprio=None if state is None else state[i]) for i in range(requests_total)]
    local = threading.local()  # a requests.Session per client thread: one kept-alive connection each
    with BackgroundServer(policy, max_batch=clients, max_wait_ms=0.0) as srv:
        def send(i):
            if not hasattr(local, "session"):
                local.session = requests.Session()
            r = local.session.post(srv.url + "/act", data=bodies[i], timeout=600)
            return json_numpy.loads(r.text)

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:  # warm-up: connections, first batches
            list(pool.map(send, range(min(requests_total, 4 * clients))))
        results = {}
        for label, workers in (("one client at a time", 1), (f"{clients} concurrent clients", clients)):
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                got = list(pool.map(send, range(requests_total)))
            results[label] = requests_total / (time.perf_counter() - start)
            worst = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
            print(f"  server, {label}: {results[label]:8.2f} requests/s; largest difference from predict_action "
                  f"{worst:.2e}")
        one, many = results.values()
        print(f"  ratio {clients} clients / one: {many / one:.2f}x (batched model calls: {srv.app.state.batcher.calls})")


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
