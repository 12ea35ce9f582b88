#!/usr/bin/env python
"""Throughput of the data pipeline on the Bridge V2 sample: 224px frames with augmentation on.

Prints frames/s of the full pipeline (through the batch transform) and the time per frame spent in
each stage, measured by running cumulative prefixes of the pipeline (read+standardize+flatten ->
+decode -> +resize -> +augment -> +pixel values -> +batch transform) in this process.

    python bench/bench_data.py [--data-dir ../shared/data] [--frames 2000] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tensorflow as tf  # noqa: E402

from ovla_jax.data import frames as F  # noqa: E402
from ovla_jax.data.batch import BatchTransform  # noqa: E402
from ovla_jax.data.pipeline import DataConfig, dataset_frames  # noqa: E402
from ovla_jax.tokenizer import CharTokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def stage_fn(stage: int, size: int):
    def fn(i, frame):
        encoded = frame["observation"]["image_primary"][-1]
        out = {"action": frame["action"], "task": frame["task"], "dataset_name": frame["dataset_name"]}
        if stage >= 1:
            image = F.decode(encoded)
            if stage >= 2:
                image = F.resize(image, size)
            if stage >= 3:
                image = F.augment(image, tf.stack([tf.constant(0, tf.int64), i]))
            out["image"] = image
            if stage >= 4:
                out["pixel_values"] = F.pixel_values(image)
        else:
            out["encoded"] = encoded
        return out
    return fn


def measure(cfg: DataConfig, stage: int, n: int, batch_transform=None) -> float:
    """Seconds per frame of the pipeline prefix ending at ``stage`` (after one warm-up batch)."""
    ds, _ = dataset_frames(cfg, "bridge_dataset", "train", train=True, seed=0, threads=cfg.threads)
    ds = ds.enumerate().map(stage_fn(stage, cfg.image_size), num_parallel_calls=cfg.threads, deterministic=True)
    it = ds.batch(32).prefetch(2).as_numpy_iterator()
    next(it)
    start, seen = time.perf_counter(), 0
    while seen < n:
        batch = next(it)
        if batch_transform is not None:
            batch_transform(batch)
        seen += len(batch["action"])
    return (time.perf_counter() - start) / seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    cfg = DataConfig(data_dir=args.data_dir, mixture="bridge_dataset", augment=True, shuffle_buffer=1000,
                     threads=args.threads, stats_cache_dir=os.path.join(os.path.expanduser("~"), ".cache", "ovla_jax", "stats"))
    bt = BatchTransform(CharTokenizer(), max_length=128)
    names = ["read + standardize + normalize + flatten + shuffle", "+ decode JPEG", "+ resize 224 lanczos3",
             "+ augment", "+ pixel values (2 towers)", "+ batch transform (tokenize, labels)"]
    per_frame = [measure(cfg, min(s, 4), args.frames, bt if s == 5 else None) for s in range(6)]
    print(f"full pipeline (224px, augmentation on, {args.threads} threads): {1.0 / per_frame[-1]:.0f} frames/s")
    print("time per frame by stage (cumulative prefixes, differences):")
    previous = 0.0
    for name, total in zip(names, per_frame):
        print(f"  {name:55s} {1e3 * max(total - previous, 0.0):7.3f} ms  (prefix {1e3 * total:.3f} ms)")
        previous = total
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
