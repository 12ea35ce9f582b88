"""``ovla-jax train --config configs/train/<name>.py[:variant] --workdir DIR [--config.field=value ...]``.

Config files are ml_collections files (``get_config()``), overridable field by field on the command line.
``--dataset-spec my_robot.yaml`` declares your own dataset (ovla_jax/data/spec_file.py). Config files
may live anywhere and import ``configs.*`` (installed with the package). Re-running with the same
workdir resumes from its latest checkpoint. Exit codes: 0 trained or
preempted (checkpoint saved), 1 stopped on a non-finite loss or non-finite parameters (nothing
non-finite is saved), 2 bad config / data / checkpoint, 3 an internal error (a traceback).
"""
from __future__ import annotations

import logging
import os
import sys

USAGE = ("usage: ovla-jax train --config configs/train/<name>.py[:variant] --workdir DIR "
         "[--config.<field>=<value> ...] [--dataset-spec FILE.yaml] [--distributed [--coordinator HOST:PORT --num_processes N --process_id I]] "
         "[--noprogress]")


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


def _underscored(arg: str) -> str:
    """``--num-processes=2`` -> ``--num_processes=2`` (absl flags are underscored; both spellings work).
    Config overrides (``--config.a_b=...``) and values are left alone."""
    if not arg.startswith("--") or arg.startswith("--config"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def parse_config_flags(argv: list[str], verb: str, usage: str, define=None):
    """``--config FILE[:variant]`` with ``--config.x=y`` overrides, plus the flags ``define(flag_values)``
    adds -> the parsed FlagValues, or raises SystemExit(2) with a message naming the problem."""
    from absl import flags
    from ml_collections import config_flags

    path = _config_path(argv)
    if path is None:
        print(f"{verb}: error: --config is required\n{usage}", file=sys.stderr)
        raise SystemExit(2)
    if not os.path.isfile(path.split(":", 1)[0]):
        print(f"{verb}: error: config file {path.split(':', 1)[0]!r} not found", file=sys.stderr)
        raise SystemExit(2)
    _add_config_root(path)
    fv = flags.FlagValues()
    args = [f"ovla-jax {verb}"] + [_underscored(a) for a in argv]
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True,
                                    sys_argv=args)  # overrides are read from these args, not sys.argv
    if define is not None:
        define(fv)
    try:
        fv(args)
    except flags.Error as e:
        print(f"{verb}: error: {e}\n{usage}", file=sys.stderr)
        raise SystemExit(2) from None
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no config field
        print(f"{verb}: error: config override names an unknown field: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as e:  # a config file's get_config() rejected its variant
        print(f"{verb}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except ImportError as e:  # the config file imports something that is not there
        hint = (" (configs.* comes with the package: reinstall ovla-jax, pip install -e <checkout>)"
                if getattr(e, "name", "") and e.name.split(".")[0] == "configs" else "")
        print(f"{verb}: error: config file {path.split(':', 1)[0]!r}: {type(e).__name__}: {e}{hint}", file=sys.stderr)
        raise SystemExit(2) from None
    return fv


def _define_train_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "run directory (local or gs://): checkpoints, TensorBoard, config",
                        flag_values=fv)
    flags.DEFINE_bool("distributed", False, "multi-process run: jax.distributed.initialize(), auto-detected on "
                      "TPU pods, GKE and SLURM unless --coordinator etc. are given", flag_values=fv)
    flags.DEFINE_string("coordinator", None, "host:port of process 0's coordination service (implies --distributed)",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator)", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1 (with --coordinator)",
                         flag_values=fv)
    flags.DEFINE_multi_string("dataset_spec", [], "a dataset declared in a YAML / JSON file (repeatable; added to "
                              "config.data.dataset_specs; with an empty data.mixture, the one it declares is trained on)",
                              flag_values=fv)
    flags.DEFINE_bool("progress", True, "console progress (a bar on a terminal, else a line every log_every steps)",
                      flag_values=fv)


def parse(argv: list[str]):
    """-> (config, workdir, flags) or raises SystemExit(2) with a message."""
    fv = parse_config_flags(argv, "train", USAGE, _define_train_flags)
    if not fv.workdir:
        print(f"train: error: --workdir is required\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    config = fv.config
    if fv.dataset_spec:
        with config.unlocked():
            config.data.dataset_specs = tuple(config.data.get("dataset_specs") or ()) + tuple(fv.dataset_spec)
    return config, fv.workdir, fv


def init_distributed(fv) -> None:
    """``jax.distributed.initialize`` from explicit flags, or auto-detected (Cloud TPU VMs, GKE, SLURM,
    Open MPI: JAX's own cluster detection). Raises SystemExit(2) on incomplete flags."""
    import jax

    explicit = [fv.coordinator, fv.num_processes, fv.process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            print("train: error: --coordinator, --num_processes and --process_id go together", file=sys.stderr)
            raise SystemExit(2)
        if not 0 <= fv.process_id < fv.num_processes:
            print(f"train: error: --process_id {fv.process_id} is not in 0..{fv.num_processes - 1}", file=sys.stderr)
            raise SystemExit(2)
        jax.distributed.initialize(fv.coordinator, num_processes=fv.num_processes, process_id=fv.process_id)
        return
    try:
        jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
        print(f"train: error: --distributed could not detect a cluster (Cloud TPU, GKE, SLURM, Open MPI): {e}; "
              f"pass --coordinator HOST:PORT --num_processes N --process_id I", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv: list[str]) -> int:
    try:
        config, workdir, fv = parse(argv)
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if fv.distributed or fv.coordinator:
            init_distributed(fv)
    except SystemExit as e:
        return int(e.code or 0)
    from ovla_jax.checkpoints.errors import CheckpointError
    from ovla_jax.data.errors import DataError
    from ovla_jax.train.loop import ConfigError, train

    try:
        result = train(config, workdir, progress=fv.progress)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a bug, not a bad input: never exit 1, which means a non-finite loss
        import traceback

        traceback.print_exc()
        print("train: internal error (the traceback above; please report it). Checkpoints already written are "
              "intact: re-running resumes from the latest.", file=sys.stderr)
        return 3
    import jax

    if jax.process_index() == 0:  # the others' outcome is the same; process 0 reports it
        print(result.message)
    return 1 if result.status == "nan" else 0
