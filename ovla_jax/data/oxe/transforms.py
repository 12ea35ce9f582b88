"""Per-dataset standardization: raw RLDS trajectory -> ``action`` float32[T, 7] = EEF delta xyz (3) +
delta roll-pitch-yaw (3) + gripper (1 = open, 0 = closed), keeping the observation keys the registry
names and ``language_instruction``. Bridge needs real code (relabeling); the others are a recipe of
action pieces (``recipes.py``). ``STANDARDIZE`` maps dataset name -> transform.
"""
from __future__ import annotations

from typing import Any, Dict

import tensorflow as tf

from ovla_jax.data.oxe.recipes import (absolute, binarize_gripper, binarized, clipped, cols, euler_from_quat, field,
                                       inverted, language_table_instruction, ones, recipe, state, zeros)

Trajectory = Dict[str, Any]


def _drop_first_step(traj: Trajectory) -> Trajectory:
    """Bridge's first step has an all-zero action: drop it from every per-step field."""
    return {k: (v if k == "traj_metadata" else tf.nest.map_structure(lambda x: x[1:], v)) for k, v in traj.items()}


def _relabel_with_achieved_motion(traj: Trajectory) -> Trajectory:
    """Replace Bridge's commanded motion by the achieved EEF motion state[t+1] - state[t] (the commands
    do not match what the robot did); the last step, without a successor, is dropped."""
    state = traj["observation"]["state"]
    motion = state[1:, :6] - state[:-1, :6]
    out = tf.nest.map_structure(lambda x: x[:-1], traj)
    out["action"] = tf.concat([motion, traj["action"][:-1, -1:]], axis=1)
    return out


def bridge_orig(traj: Trajectory) -> Trajectory:
    """Bridge V2 as released on the project site (``bridge_orig`` / ``bridge_dataset``): action [T, 7]
    with a continuous gripper; state [T, 7] = EEF xyz + rpy + gripper."""
    traj = _drop_first_step(traj)
    traj["action"] = tf.concat([traj["action"][:, :6], binarize_gripper(traj["action"][:, -1])[:, None]], axis=1)
    traj = _relabel_with_achieved_motion(traj)
    traj["observation"]["EEF_state"] = traj["observation"]["state"][:, :6]
    traj["observation"]["gripper_state"] = traj["observation"]["state"][:, -1:]
    return traj


def bridge_oxe(traj: Trajectory) -> Trajectory:
    """Bridge V2 as stored in the OXE bucket: action is a dict (world_vector, rotation_delta, open_gripper)
    and the instruction sits in the observation."""
    traj = _drop_first_step(traj)
    action = traj["action"]
    traj["action"] = tf.concat([action["world_vector"], action["rotation_delta"],
                                tf.cast(action["open_gripper"][:, None], tf.float32)], axis=-1)
    traj["language_instruction"] = traj["observation"]["natural_language_instruction"]
    traj = _relabel_with_achieved_motion(traj)
    traj["observation"]["EEF_state"] = traj["observation"]["state"][:, :6]
    traj["observation"]["gripper_state"] = traj["observation"]["state"][:, -1:]
    return traj


def libero(traj: Trajectory) -> Trajectory:
    """LIBERO (``libero_*_no_noops``): the gripper command in [-1 open, 1 close] is clipped to [0, 1] and
    inverted (1 = open); raw state [T, 8] = EEF xyz + axis-angle (6) + two gripper joints (2) gives
    ``EEF_state`` = state[:, :6] and a 2-D ``gripper_state`` = state[:, -2:]."""
    traj = dict(traj)
    gripper = 1.0 - tf.clip_by_value(tf.cast(traj["action"][:, -1:], tf.float32), 0.0, 1.0)
    traj["action"] = tf.concat([tf.cast(traj["action"][:, :6], tf.float32), gripper], axis=1)
    observation = dict(traj["observation"])
    observation["EEF_state"] = observation["state"][:, :6]
    observation["gripper_state"] = observation["state"][:, -2:]
    traj["observation"] = observation
    return traj


def identity(traj: Trajectory) -> Trajectory:
    """Datasets already in the standard form (e.g. the built-in demo dataset)."""
    return traj


def _then(first, second):
    def standardize(traj):
        return second(first(traj))
    standardize.recipe = getattr(second, "recipe", second.__name__) + " after " + first.__name__
    return standardize


# RT-X style: a dict of action fields and the instruction in the observation.
_WV, _RD = cols(key="world_vector"), cols(key="rotation_delta")
_GRIP_REL = cols(0, 1, key="gripper_closedness_action")


def _rtx(*parts):
    return recipe(*parts, language_from_observation=True)


_MOTION6, _LAST = cols(0, 6), cols(-1, None)
_INV_CLIP_LAST = inverted(clipped(_LAST))

def ovla_tabletop(traj: Trajectory) -> Trajectory:
    """The built-in simulated tabletop (``ovla_jax/sim``) is written already standardized."""
    return traj


STANDARDIZE = {
    "ovla_tabletop": ovla_tabletop,
    "bridge_oxe": bridge_oxe,
    "bridge_orig": bridge_orig,
    "bridge_dataset": bridge_orig,
    "fractal20220817_data": _rtx(_WV, _RD, absolute(_GRIP_REL)),
    "kuka": _rtx(_WV, _RD, absolute(_GRIP_REL)),
    "taco_play": _rtx(cols(0, 6, key="rel_actions_world"), clipped(cols(-1, None, key="rel_actions_world"))),
    "jaco_play": _rtx(_WV, zeros(3), absolute(_GRIP_REL)),
    "berkeley_cable_routing": _rtx(_WV, _RD, zeros(1)),
    "roboturk": _rtx(_WV, _RD, inverted(clipped(_GRIP_REL))),
    "nyu_door_opening_surprising_effectiveness": _rtx(_WV, _RD, absolute(_GRIP_REL)),
    "viola": _rtx(_WV, _RD, inverted(clipped(_GRIP_REL))),
    "berkeley_autolab_ur5": _rtx(_WV, _RD, absolute(_GRIP_REL)),
    "toto": _rtx(_WV, _RD, cols(key="open_gripper")),
    "language_table": _then(language_table_instruction, recipe(cols(0, 2), zeros(2), zeros(2), ones(1))),
    "columbia_cairlab_pusht_real": _rtx(_WV, _RD, _GRIP_REL),
    "stanford_kuka_multimodal_dataset_converted_externally_to_rlds": recipe(cols(0, 3), zeros(3), _LAST),
    "nyu_rot_dataset_converted_externally_to_rlds": recipe(cols(0, 7)),
    "stanford_hydra_dataset_converted_externally_to_rlds": recipe(_MOTION6, inverted(_LAST)),
    "austin_buds_dataset_converted_externally_to_rlds": recipe(_MOTION6, _INV_CLIP_LAST),
    "nyu_franka_play_dataset_converted_externally_to_rlds": recipe(cols(-8, -2), clipped(cols(-2, -1))),
    "maniskill_dataset_converted_externally_to_rlds": recipe(cols(0, 7)),
    "furniture_bench_dataset_converted_externally_to_rlds": recipe(cols(0, 3), euler_from_quat(3), _INV_CLIP_LAST),
    "cmu_franka_exploration_dataset_converted_externally_to_rlds": recipe(cols(0, -1)),
    "ucsd_kitchen_dataset_converted_externally_to_rlds": recipe(cols(0, -1)),
    "ucsd_pick_and_place_dataset_converted_externally_to_rlds": recipe(cols(0, 3), zeros(3), _LAST),
    "austin_sailor_dataset_converted_externally_to_rlds": recipe(_MOTION6, _INV_CLIP_LAST),
    "austin_sirius_dataset_converted_externally_to_rlds": recipe(_MOTION6, _INV_CLIP_LAST),
    "bc_z": _rtx(cols(0, 3, key="future/xyz_residual"), cols(0, 3, key="future/axis_angle_residual"),
                 inverted(cols(0, 1, key="future/target_close"))),
    "utokyo_pr2_opening_fridge_converted_externally_to_rlds": recipe(cols(0, -1)),
    "utokyo_pr2_tabletop_manipulation_converted_externally_to_rlds": recipe(cols(0, -1)),
    "utokyo_xarm_pick_and_place_converted_externally_to_rlds": recipe(cols()),
    "utokyo_xarm_bimanual_converted_externally_to_rlds": recipe(cols(-7, None)),
    "robo_net": recipe(cols(0, 4), zeros(2), _LAST),
    "berkeley_mvp_converted_externally_to_rlds": recipe(cols()),
    "berkeley_rpt_converted_externally_to_rlds": recipe(cols()),
    "kaist_nonprehensile_converted_externally_to_rlds": recipe(_MOTION6, zeros(1)),
    "stanford_mask_vit_converted_externally_to_rlds": recipe(cols(0, 4), zeros(2), _LAST),
    "tokyo_u_lsmo_converted_externally_to_rlds": recipe(cols()),
    "dlr_sara_pour_converted_externally_to_rlds": recipe(cols()),
    "dlr_sara_grid_clamp_converted_externally_to_rlds": recipe(cols()),
    "dlr_edan_shared_control_converted_externally_to_rlds": recipe(_MOTION6, inverted(_LAST)),
    "asu_table_top_converted_externally_to_rlds": recipe(cols()),
    "stanford_robocook_converted_externally_to_rlds": recipe(cols()),
    "imperialcollege_sawyer_wrist_cam": recipe(cols(0, -1)),
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": recipe(cols(0, 3), euler_from_quat(3), cols(7, 8)),
    "uiuc_d3field": recipe(cols(0, 3), zeros(3), zeros(1)),
    "utaustin_mutex": recipe(_MOTION6, _INV_CLIP_LAST),
    "berkeley_fanuc_manipulation": recipe(cols(0, 6), inverted(state(6, 7))),
    "cmu_playing_with_food": recipe(cols(0, 3), euler_from_quat(3), _LAST),
    "cmu_play_fusion": recipe(cols(0, 3), cols(-4, None)),
    "cmu_stretch": recipe(cols(0, -1)),
    "berkeley_gnm_recon": recipe(cols(0, 2), zeros(2), zeros(2), zeros(1)),
    "berkeley_gnm_cory_hall": recipe(cols(0, 2), zeros(2), zeros(2), zeros(1)),
    "berkeley_gnm_sac_son": recipe(cols(0, 2), zeros(2), zeros(2), zeros(1)),
    "fmb_dataset": recipe(cols()),
    "dobbe": recipe(cols()),
    "roboset": recipe(cols(0, 7), _INV_CLIP_LAST),
    "rh20t": recipe(cols(key="tcp_base"), cols(key="gripper")),
    # DROID: base-frame EEF velocity + gripper position (1 = closed, so inverted). Upstream also swaps the
    # two exterior cameras at random; only the primary camera feeds the VLA, so that is not done here.
    "droid": recipe(field("action_dict/cartesian_velocity", 0, 6), inverted(field("action_dict/gripper_position"))),
    "droid_wipe": recipe(field("action_dict/cartesian_velocity", 0, 6), inverted(field("action_dict/gripper_position"))),
    **{f"libero_{suite}_no_noops": libero for suite in ("spatial", "object", "goal", "10")},
    **{f"tdroid_{task}": recipe(_MOTION6, binarized(_LAST)) for task in (
        "carrot_in_bowl", "pour_corn_in_pot", "flip_pot_upright", "move_object_onto_plate", "knock_object_over",
        "cover_object_with_towel")},
}
