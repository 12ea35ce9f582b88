"""``ovla-jax stats``: a dataset's action statistics in the official ``norm_stats`` format."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ovla_jax.data.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, help="directory holding <dataset>/<version>/ tfds dirs")
    parser.add_argument("--dataset", required=True, help="registry name, e.g. bridge_orig")
    parser.add_argument("--out", default=None, help="also write {dataset: stats} JSON here")
    parser.add_argument("--cache-dir", default=None, help="statistics cache (default ~/.cache/ovla_jax/stats)")


def run(args: argparse.Namespace) -> int:
    from ovla_jax.data import traj
    from ovla_jax.data.oxe.registry import get_spec
    from ovla_jax.data.stats import DEFAULT_CACHE, dataset_stats

    try:
        spec = get_spec(args.dataset)
        stats = dataset_stats(traj.open_builder(args.data_dir, args.dataset), spec, args.cache_dir or DEFAULT_CACHE,
                              progress=True)
    except DataError as e:
        print(f"stats: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps({args.dataset: stats}, indent=2)
    if args.out:
        tmp = f"{args.out}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    print(text)
    return 0
