"""``ovla-jax stats``: action statistics in the official ``norm_stats`` format, for one dataset or every
usable dataset of a named mixture (computed once, then read from the cache; ``--cache-dir gs://...``
gives every host of a pod the same cache)."""
from __future__ import annotations

import argparse
import json
import sys

from ovla_jax.data.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, help="directory holding <dataset>/<version>/ tfds dirs")
    parser.add_argument("--dataset", default=None, help="registry name (e.g. bridge_orig) or a mixture name "
                        "(e.g. oxe_magic_soup_plus_minus: every usable dataset in it); default: the one --dataset-spec "
                        "declares")
    parser.add_argument("--dataset-spec", action="append", default=[], metavar="FILE",
                        help="your own dataset, declared in a YAML / JSON file (repeatable)")
    parser.add_argument("--out", default=None, help="also write {dataset: stats} JSON here")
    parser.add_argument("--cache-dir", default=None, help="statistics cache (default ~/.cache/ovla_jax/stats)")


def run(args: argparse.Namespace) -> int:
    from ovla_jax import fileio
    from ovla_jax.data import traj
    from ovla_jax.data.oxe.mixtures import MIXTURES
    from ovla_jax.data.oxe.registry import get_spec
    from ovla_jax.data.pipeline import usable_datasets
    from ovla_jax.data.stats import DEFAULT_CACHE, dataset_stats

    from ovla_jax.data import spec_file

    try:
        declared = spec_file.register(args.dataset_spec)
        dataset = args.dataset or (declared[0].name if len(declared) == 1 else None)
        if dataset is None:
            raise DataError("name the dataset: --dataset NAME (or give exactly one --dataset-spec)")
        names = [n for n, _ in usable_datasets(dataset)] if dataset in MIXTURES else [dataset]
        specs = {name: get_spec(name) for name in names}  # unknown names fail before any data is read
        stats = {name: dataset_stats(traj.open_builder(args.data_dir, name), spec, args.cache_dir or DEFAULT_CACHE,
                                     progress=True) for name, spec in specs.items()}
    except DataError as e:
        print(f"stats: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(stats, indent=2)
    if args.out:
        fileio.write_text(args.out, text + "\n")
    print(text)
    return 0
