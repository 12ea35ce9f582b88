"""``ovla-jax eval``: closed-loop success of any checkpoint on the built-in tabletop tasks, or (with
``--data``) offline action error on a held-out split of your own dataset.

    ovla-jax eval --checkpoint workdir/demo/run               # an ovla-jax train workdir (LoRA merged)
    ovla-jax eval --checkpoint /ckpts/my-model-hf --baselines  # or an ovla-jax / HF checkpoint dir
    ovla-jax eval --checkpoint runs/my_robot --data data --dataset-spec data/my_robot.yaml   # offline

Closed loop prints per-task success rates with Wilson 95% intervals (and the random / expert baselines
with ``--baselines``). Offline prints the L1 error of the first action per dim (dataset units), token
accuracy (token heads) and the chunk's L1 (chunked heads) over the ``--split`` (default val: the
dataset's, or the episodes training held out). ``--out`` writes the results as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="train workdir / checkpoint, ovla-jax dir, or HF dir")
    p.add_argument("--step", type=int, default=None, help="train checkpoints: the step (default latest)")
    p.add_argument("--episodes", type=int, default=50, help="episodes per task")
    p.add_argument("--tasks", default="pick,place", help="comma-separated tasks")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed set")
    p.add_argument("--tokenizer", default=None,
                   help="'char', 'words' or a local HF tokenizer dir (default: the training run's, else 'char')")
    p.add_argument("--stats-key", default=None, help="dataset whose action statistics unnormalize the actions")
    p.add_argument("--max-length", type=int, default=None, help="prompt length (default: the training one, or 160)")
    p.add_argument("--baselines", action="store_true", help="also run the random and expert policies")
    p.add_argument("--execute", type=int, default=None,
                   help="chunked (OFT) policies: steps of each chunk to run before re-planning (default: all)")
    p.add_argument("--record", type=int, default=0, help="episodes per task to draw into a filmstrip")
    p.add_argument("--out", default=None, help="write the results as JSON here (and the filmstrip next to it)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="inference precision")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="weight-only: int8 per output channel, int4 per group of 128 input rows")
    p.add_argument("--noprogress", action="store_true")
    g = p.add_argument_group("offline evaluation on recorded data")
    g.add_argument("--data", default=None, metavar="DIR", help="data dir holding the dataset: evaluate offline")
    g.add_argument("--dataset", default=None, help="dataset name (default: the spec's, or the checkpoint's only one)")
    g.add_argument("--dataset-spec", action="append", default=[], metavar="FILE", help="your dataset's spec file")
    g.add_argument("--split", default="val", help="split to evaluate on (val: held-out episodes when there is none)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (default: all)")
    g.add_argument("--stats-cache-dir", default=None, help="statistics cache (default ~/.cache/ovla_jax/stats)")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ovla_jax.checkpoints.errors import CheckpointError
    from ovla_jax.eval import closed_loop as E
    from ovla_jax.policy import OpenVLAPolicy

    if args.data:
        return _offline(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        policy = OpenVLAPolicy.from_pretrained(args.checkpoint, args.tokenizer, args.step, args.max_length,
                                               dtype=args.dtype, quantize=args.quantize)
        policy.action_stats(args.stats_key)  # fail now, not mid-rollout, when the statistics are ambiguous
        policies = {"openvla": E.vla_policy(policy, args.stats_key)}
        if args.baselines:
            policies.update(random=E.random_policy(args.seed), expert=E.expert_policy)
        episodes = {name: E.rollout(fn, args.episodes, tasks, seed=args.seed, record=args.record if name == "openvla" else 0,
                                    progress=not args.noprogress, execute=args.execute if name == "openvla" else None)
                    for name, fn in policies.items()}
    except (CheckpointError, ValueError, KeyError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    results = {name: E.summarize(eps) for name, eps in episodes.items()}
    print(E.format_table(results))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"checkpoint": os.path.abspath(args.checkpoint), "tasks": tasks, "seed": args.seed,
                       "results": results}, f, indent=2)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
        if args.record:
            from ovla_jax.sim import figures

            strip = os.path.splitext(args.out)[0] + "_filmstrip.png"
            figures.filmstrip(strip, [e for e in episodes["openvla"] if e.frames is not None])
            print(f"wrote {strip}")
    return 0


def _offline(args: argparse.Namespace) -> int:
    from ovla_jax.checkpoints.errors import CheckpointError
    from ovla_jax.data import spec_file
    from ovla_jax.data.errors import DataError
    from ovla_jax.eval import offline
    from ovla_jax.policy import OpenVLAPolicy

    try:
        declared = spec_file.register(args.dataset_spec)
        policy = OpenVLAPolicy.from_pretrained(args.checkpoint, args.tokenizer, args.step, args.max_length,
                                               dtype=args.dtype, quantize=args.quantize)
        dataset = args.dataset or (declared[0].name if len(declared) == 1 else None)
        if dataset is None:
            if len(policy.norm_stats) != 1:
                raise DataError(f"name the dataset: --dataset (the checkpoint knows {sorted(policy.norm_stats)})")
            dataset = next(iter(policy.norm_stats))
        result = offline.evaluate(policy, args.data, dataset, args.split, batch_size=args.batch_size,
                                  max_batches=args.max_batches, dataset_specs=args.dataset_spec,
                                  stats_cache_dir=args.stats_cache_dir, progress=not args.noprogress)
    except (CheckpointError, DataError, ValueError, KeyError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    print(offline.format_report(result))
    if args.out:
        from ovla_jax import fileio

        fileio.write_text(args.out, json.dumps({"checkpoint": os.path.abspath(args.checkpoint), **result}, indent=2))
        print(f"wrote {args.out}")
    return 0
