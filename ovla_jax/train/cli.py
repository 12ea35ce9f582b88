"""``ovla-jax train --config configs/train/<name>.py[:variant] --workdir DIR [--config.field=value ...]``.

Config files are ml_collections files (``get_config()``), overridable field by field on the command line.
Re-running with the same workdir resumes from its latest checkpoint. Exit codes: 0 trained or
preempted (checkpoint saved), 1 stopped on a non-finite loss, 2 bad config / data / checkpoint.
"""
from __future__ import annotations

import logging
import os
import sys

USAGE = ("usage: ovla-jax train --config configs/train/<name>.py[:variant] --workdir DIR "
         "[--config.<field>=<value> ...] [--distributed] [--noprogress]")


def _config_path(argv: list[str]):
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _add_config_root(path: str) -> None:
    """Config files import ``configs.*``: put the directory holding ``configs/`` on sys.path."""
    here = os.path.dirname(os.path.abspath(path.split(":", 1)[0]))
    while here != os.path.dirname(here):
        if os.path.isfile(os.path.join(here, "configs", "__init__.py")):
            if here not in sys.path:
                sys.path.insert(0, here)
            return
        here = os.path.dirname(here)


def parse(argv: list[str]):
    """-> (config, workdir, flags) or raises SystemExit(2) with a message."""
    from absl import flags
    from ml_collections import config_flags

    path = _config_path(argv)
    if path is None:
        print(f"train: error: --config is required\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    if not os.path.isfile(path.split(":", 1)[0]):
        print(f"train: error: config file {path.split(':', 1)[0]!r} not found", file=sys.stderr)
        raise SystemExit(2)
    _add_config_root(path)
    fv = flags.FlagValues()
    args = ["ovla-jax train"] + list(argv)
    config_flags.DEFINE_config_file("config", None, "training config file", flag_values=fv, lock_config=True,
                                    sys_argv=args)  # overrides are read from these args, not sys.argv
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, TensorBoard, config)", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host pods)", flag_values=fv)
    flags.DEFINE_bool("progress", True, "console progress bar", flag_values=fv)
    try:
        fv(args)
    except flags.Error as e:
        print(f"train: error: {e}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2) from None
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no config field
        print(f"train: error: config override names an unknown field: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not fv.workdir:
        print(f"train: error: --workdir is required\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    return fv.config, fv.workdir, fv


def run(argv: list[str]) -> int:
    try:
        config, workdir, fv = parse(argv)
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import jax

    if fv.distributed:
        jax.distributed.initialize()
    from ovla_jax.checkpoints.errors import CheckpointError
    from ovla_jax.data.errors import DataError
    from ovla_jax.train.loop import ConfigError, train

    try:
        result = train(config, workdir, progress=fv.progress)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    print(result.message)
    return 1 if result.status == "nan" else 0
