"""``ovla-jax serve --checkpoint DIR``: load any checkpoint ``OpenVLAPolicy.from_pretrained`` loads,
compile every batch bucket, then serve the official REST protocol (``POST /act``), openpi's websocket
protocol (``ws://HOST:PORT``), ``GET /healthz`` and ``GET /metadata`` with uvicorn."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="train workdir / ovla-jax dir / HF dir (OFT dirs too)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--unnorm-key", default=None, help="statistics for requests that name none")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch one model call takes (buckets 1, 2, 4, ...)")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long a request waits for company when the model is idle (0: run at once; requests "
                        "arriving while the model runs join the next call either way)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body / websocket frame")
    p.add_argument("--obs-keys", default=None, help="openpi observation keys, e.g. "
                   "'image=observation/image,wrist_image=observation/wrist_image,proprio=observation/state,instruction=prompt'")
    p.add_argument("--dataset-spec", default=None, metavar="FILE",
                   help="your dataset's spec file: its name becomes the default --unnorm-key, and openpi clients may "
                        "send its camera keys (observation/<primary key>, observation/<wrist key>) unless --obs-keys says otherwise")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec when the checkpoint does not record one")
    p.add_argument("--max-length", type=int, default=None)


def build(args, progress=print):
    """-> (app, policy): the policy loaded, every bucket compiled."""
    from ovla_jax.policy import OpenVLAPolicy
    from ovla_jax.serve.app import ObservationKeys, serving_app

    keys = ObservationKeys.parse(args.obs_keys)
    unnorm_key = args.unnorm_key
    spec = None
    if getattr(args, "dataset_spec", None):
        from ovla_jax.data import spec_file

        spec = spec_file.load(args.dataset_spec)
        if not args.obs_keys:  # the robot sends what its dataset recorded
            keys = dataclasses.replace(keys, image=f"observation/{spec.cameras['primary']}",
                                       **({"wrist_image": f"observation/{spec.cameras['wrist']}"}
                                          if spec.cameras.get("wrist") else {}))
    t = time.perf_counter()
    policy = OpenVLAPolicy.from_pretrained(args.checkpoint, args.tokenizer, max_length=args.max_length, dtype=args.dtype,
                                           quantize=args.quantize)
    if spec is not None and unnorm_key is None:
        if spec.name not in policy.norm_stats:
            raise ValueError(f"{args.checkpoint} has no statistics for {spec.name!r} (from {args.dataset_spec}); "
                             f"it has {sorted(policy.norm_stats)}")
        unnorm_key = spec.name
    progress(f"loaded {args.checkpoint} ({args.dtype}, quantize {args.quantize}) in {time.perf_counter() - t:.1f}s")
    app = serving_app(policy, name=os.path.basename(os.path.normpath(args.checkpoint)), max_batch=args.max_batch,
                      max_wait_ms=args.max_wait_ms, max_body_bytes=int(args.max_body_mb * (1 << 20)), keys=keys,
                      unnorm_key=unnorm_key, progress=progress)
    return app, policy


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ovla_jax.checkpoints.errors import CheckpointError
    from ovla_jax.data.errors import DataError
    from ovla_jax.serve.requests import BadRequest

    try:
        import uvicorn
    except ImportError:
        print("serve: needs the serving extra: pip install 'ovla-jax[serve]'", file=sys.stderr)
        return 2
    try:
        app, _ = build(args)
    except (CheckpointError, BadRequest, DataError, ValueError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    print(f"serving on http://{args.host}:{args.port} (POST /act, GET /healthz, GET /metadata) and "
          f"ws://{args.host}:{args.port} (openpi)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                ws_max_size=int(args.max_body_mb * (1 << 20)))
    return 0
