"""Checkpoint conversion between the HF PyTorch layout and ovla-jax's own (``ovla-jax convert``)."""
from __future__ import annotations

import argparse
import sys
import time

from ovla_jax.checkpoints import hf
from ovla_jax.checkpoints.errors import CheckpointError

FORMATS = ("hf", "jax")
SOURCE_FORMATS = FORMATS + ("train",)  # train: an orbax train checkpoint (workdir, checkpoints dir or step dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="src_format", choices=SOURCE_FORMATS, required=True,
                        help="format of SRC (train = an `ovla-jax train` workdir or checkpoint; LoRA is merged)")
    parser.add_argument("--step", type=int, default=None, help="with --from train: the step (default: latest)")
    parser.add_argument("--base", default=None,
                        help="with --from train: where the run's frozen base checkpoint is now (default: the "
                             "init_checkpoint the run recorded; the adapters are merged into its original weights)")
    parser.add_argument("--to", dest="dst_format", choices=FORMATS, required=True, help="format to write")
    parser.add_argument("src", metavar="SRC", help="source checkpoint directory")
    parser.add_argument("dst", metavar="DST", help="destination directory (written atomically)")
    parser.add_argument("--dtype", choices=sorted(hf.DTYPES), default=None,
                        help="cast every tensor (default: keep each tensor's dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="HF output shard size (GiB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def convert(src: str, dst: str, src_format: str, dst_format: str, dtype: str | None = None,
            overwrite: bool = False, max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
            step: int | None = None, base: str | None = None) -> None:
    """Stream SRC in one format into DST in another (or the same: a re-shard / dtype cast), one tensor
    at a time; DST appears only when complete."""
    if src_format == "train":
        from ovla_jax.checkpoints.train_dir import export_checkpoint

        export_checkpoint(src, dst, hf.LAYOUTS[dst_format], step=step, dtype=dtype, overwrite=overwrite,
                          max_shard_bytes=max_shard_bytes, progress=progress, base=base)
        return
    if base is not None:
        raise CheckpointError("--base applies to --from train only")
    hf.convert_checkpoint(src, dst, hf.LAYOUTS[src_format], hf.LAYOUTS[dst_format], dtype=dtype, overwrite=overwrite,
                          max_shard_bytes=max_shard_bytes, progress=progress)


def run(args: argparse.Namespace) -> int:
    start = time.time()
    try:
        convert(args.src, args.dst, args.src_format, args.dst_format, args.dtype, args.overwrite,
                int(args.max_shard_gb * 1024**3), progress=not args.quiet, step=args.step, base=args.base)
    except CheckpointError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.src} ({args.src_format}) -> {args.dst} ({args.dst_format}) in {time.time() - start:.1f}s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="convert_weights", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
