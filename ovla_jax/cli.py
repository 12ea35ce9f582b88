"""``ovla-jax <verb>``: the command-line entry point (``python -m ovla_jax <verb>`` is the same)."""
from __future__ import annotations

import argparse
import os
import sys

def _demo(args: argparse.Namespace) -> int:
    from ovla_jax import demo

    return demo.run(args)


def _serve(args: argparse.Namespace) -> int:
    from ovla_jax.serve import cli as serve_cli

    return serve_cli.run(args)


def _eval(args: argparse.Namespace) -> int:
    from ovla_jax.eval import cli as eval_cli

    return eval_cli.run(args)


def _train(argv) -> int:
    from ovla_jax.train import cli

    if not argv or argv[0] in ("-h", "--help"):
        print(cli.__doc__ + "\n" + cli.USAGE)
        return 0
    return cli.run(argv)


def _compile(argv) -> int:
    from ovla_jax.train import compile_cli

    if not argv or argv[0] in ("-h", "--help"):
        print(compile_cli.__doc__ + "\n" + compile_cli.USAGE)
        return 0
    return compile_cli.run(argv)


def build_parser() -> argparse.ArgumentParser:
    from ovla_jax import convert

    parser = argparse.ArgumentParser(prog="ovla-jax", description="OpenVLA in JAX")
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("convert", help="convert checkpoints between the HF PyTorch and ovla-jax formats")
    convert.add_arguments(p)
    p.set_defaults(run=convert.run)
    from ovla_jax.data import stats_cli

    p = verbs.add_parser("stats", help="action statistics of a dataset (official norm_stats format, cached)")
    stats_cli.add_arguments(p)
    p.set_defaults(run=stats_cli.run)
    from ovla_jax.data.importers import cli as import_cli

    p = verbs.add_parser("import", help="LeRobot / HDF5 (robomimic, ACT) robot data -> RLDS + a dataset spec",
                         description=import_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    import_cli.add_arguments(p)
    p.set_defaults(run=import_cli.run)
    p = verbs.add_parser("train", help="train or fine-tune (configs/train/*.py); resumes from the workdir",
                         add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(run=lambda args: _train(args.rest))
    p = verbs.add_parser("compile", help="ahead-of-time compile of the train step for a TPU slice: fits? how fast?",
                         add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(run=lambda args: _compile(args.rest))
    from ovla_jax import demo
    from ovla_jax.eval import cli as eval_cli

    p = verbs.add_parser("demo", help="the built-in main job: demonstrations -> training -> closed-loop success",
                         description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    p.set_defaults(run=_demo)
    p = verbs.add_parser("eval", help="closed-loop success of a checkpoint on the built-in tasks",
                         description=eval_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_cli.add_arguments(p)
    p.set_defaults(run=_eval)
    from ovla_jax.serve import cli as serve_cli

    p = verbs.add_parser("serve", help="serve a policy: official REST (POST /act) and openpi websocket clients",
                         description=serve_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_cli.add_arguments(p)
    p.set_defaults(run=_serve)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ info/warning chatter
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":  # absl flags (--config.x=y) are parsed by the train verb itself
        return _train(argv[1:])
    if argv and argv[0] == "compile":
        return _compile(argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args)
