"""``ovla-jax import FORMAT SRC --data-dir DIR --name NAME``: robot data you have -> RLDS + a dataset spec.

    ovla-jax import lerobot ~/lerobot/my_robot --data-dir data --name my_robot
    ovla-jax import hdf5 demos.hdf5 --data-dir data --name my_robot --state-keys robot0_eef_pos,robot0_gripper_qpos
    ovla-jax import hdf5 aloha_episodes/ --data-dir data --name my_aloha --instruction "fold the towel"

Writes DIR/NAME/1.0.0 (episodes streamed one at a time, images as PNG: nothing lost) and DIR/NAME.yaml
(the spec: pass it to stats / train / eval / serve with --dataset-spec). Exit codes: 0 written,
2 bad input (nothing left behind).
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ovla_jax.data.importers import FORMATS

    p.add_argument("format", choices=FORMATS, help="lerobot: LeRobot v2.x / v3.0 dataset dir; hdf5: robomimic file or "
                   "ACT/ALOHA episode files")
    p.add_argument("source", help="the dataset directory or file")
    p.add_argument("--data-dir", required=True, help="where the RLDS dataset goes (DIR/NAME/1.0.0)")
    p.add_argument("--name", required=True, help="dataset name (the spec's name and the directory's)")
    p.add_argument("--instruction", default=None, help="instruction of every episode (when the source records none)")
    p.add_argument("--state-keys", default=None, help="comma-separated state fields, concatenated (default: "
                   "LeRobot observation.state, ACT observations/qpos, robomimic none)")
    p.add_argument("--cameras", default=None, help="comma-separated cameras to keep (default: all)")
    p.add_argument("--primary", default=None, help="camera the spec names primary (default: the first non-wrist)")
    p.add_argument("--wrist", default=None, help="camera the spec names wrist (default: one named *wrist*)")
    p.add_argument("--gripper-dim", type=int, default=None, help="action dim of the gripper (declared in the spec)")
    p.add_argument("--gripper-open", type=float, default=1.0, help="its value when open")
    p.add_argument("--gripper-closed", type=float, default=0.0, help="its value when closed")
    p.add_argument("--val-episodes", type=int, default=0, help="write the last N episodes as a 'val' split "
                   "(default 0: training holds out 5%% itself)")
    p.add_argument("--spec-out", default=None, help="spec file path (default DIR/NAME.yaml)")
    p.add_argument("--noprogress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import os
    import shutil

    from ovla_jax.data.errors import DataError
    from ovla_jax.data.importers import open_reader, write

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    options = {"instruction": args.instruction, "state_keys": split(args.state_keys), "cameras": split(args.cameras)}
    target = os.path.join(args.data_dir, args.name)
    existed = os.path.exists(target)
    try:
        reader = open_reader(args.format, args.source, **options)
        gripper = None if args.gripper_dim is None else {"dim": args.gripper_dim, "open": args.gripper_open,
                                                         "closed": args.gripper_closed}
        path, spec, summary = write(reader, args.data_dir, args.name, val_episodes=args.val_episodes,
                                    primary=args.primary, wrist=args.wrist, gripper=gripper, spec_path=args.spec_out,
                                    progress=not args.noprogress)
    except DataError as e:
        if not existed and os.path.isdir(target):  # a half-written import: nothing left behind
            shutil.rmtree(target, ignore_errors=True)
        print(f"import: error: {e}", file=sys.stderr)
        return 2
    print(summary.text(path, spec))
    return 0
