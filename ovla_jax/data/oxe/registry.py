"""The ONE registry of datasets: camera keys, state/action encodings and the standardization transform.

Entries list only what differs from the defaults (``_spec``). Only EEF_POS / EEF_R6 datasets feed the
VLA; the others are registered so that mixtures naming them fail or skip with a reason, not a KeyError.
Standardization transforms come from ``transforms.STANDARDIZE``; a dataset without one is a clear
error when used alone and is skipped, with a warning, in a mixture.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Mapping, Optional

from ovla_jax.data.errors import DataError
from ovla_jax.data.oxe import transforms as T
from ovla_jax.data.oxe.recipes import field, obs, zeros, zlib_floats


class StateEncoding(enum.IntEnum):
    NONE = -1
    POS_EULER = 1  # EEF xyz (3) + rpy (3) + pad (1) + gripper (1)
    POS_QUAT = 2  # EEF xyz (3) + quaternion (4) + gripper (1)
    JOINT = 3  # joint angles (7, padded) + gripper (1)
    JOINT_BIMANUAL = 4


class ActionEncoding(enum.IntEnum):
    EEF_POS = 1  # EEF delta xyz (3) + rpy (3) + gripper (1)
    JOINT_POS = 2
    JOINT_POS_BIMANUAL = 3
    EEF_R6 = 4  # EEF delta xyz (3) + R6 (6) + gripper (1)


VLA_ACTION_ENCODINGS = (ActionEncoding.EEF_POS, ActionEncoding.EEF_R6)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    cameras: Mapping[str, Optional[str]]  # primary / secondary / wrist -> observation key
    state_encoding: StateEncoding
    action_encoding: ActionEncoding
    standardize: Optional[Callable]
    language_key: str = "language_instruction"
    # BOUNDS_Q99 normalizes the 6 motion dims; the gripper (last) stays as is. None: every dim.
    action_normalization_mask: Optional[tuple] = (True,) * 6 + (False,)
    drop_zero_motion: bool = False  # drop frames whose 6 motion dims are all zero (DROID's idle frames)
    # Proprio: the pieces (after standardization) concatenated into the state the model reads: an
    # observation key (the whole field), a recipe Part (columns of a field, zeros, ...), or None = one
    # zero column (upstream's padding). Empty = the dataset gives no proprio. See _STATE_KEYS.
    state_keys: tuple = ()
    # A dataset declared in a spec file (ovla_jax/data/spec_file.py): that file. Its actions feed the VLA
    # whatever their encoding (the user chose them), and errors name the file.
    declared_in: Optional[str] = None
    gripper_dim: Optional[int] = None  # with a mask of None: the one dim left unnormalized
    normalization: Optional[str] = None  # the kind a spec file asks for (None: the run's)

    @property
    def loads_for_vla(self) -> bool:
        return self.declared_in is not None or self.action_encoding in VLA_ACTION_ENCODINGS

    def normalization_mask(self, action_dim: int) -> list:
        """Which action dims are normalized: the entry's mask, or (mask ``None``) every dim but the gripper's."""
        mask = self.action_normalization_mask
        if mask is None:
            skip = None if self.gripper_dim is None else self.gripper_dim % action_dim
            return [i != skip for i in range(action_dim)]
        if len(mask) != action_dim:
            where = f" (declared in {self.declared_in})" if self.declared_in else ""
            raise DataError(f"dataset {self.name!r}{where}: its normalization mask has {len(mask)} dims but its "
                            f"actions have {action_dim}")
        return [bool(m) for m in mask]


def _spec(primary, secondary=None, wrist=None, state=StateEncoding.POS_EULER, action=ActionEncoding.EEF_POS, **kw):
    return dict(cameras={"primary": primary, "secondary": secondary, "wrist": wrist}, state_encoding=state,
                action_encoding=action, **kw)


S, A = StateEncoding, ActionEncoding
_TABLE = {
    # The built-in simulated tabletop of the demo (ovla_jax/sim): one 64px top-down camera, no state.
    "ovla_tabletop": _spec("image", wrist="wrist_image", state=S.NONE),
    "fractal20220817_data": _spec("image", state=S.POS_QUAT),
    "kuka": _spec("image", state=S.POS_QUAT),
    "bridge_oxe": _spec("image", "image_1"),
    "bridge_orig": _spec("image_0", "image_1"),
    "bridge_dataset": _spec("image_0", "image_1"),
    "taco_play": _spec("rgb_static", wrist="rgb_gripper"),
    "jaco_play": _spec("image", wrist="image_wrist"),
    "berkeley_cable_routing": _spec("image", "top_image", "wrist45_image", state=S.JOINT),
    "roboturk": _spec("front_rgb", state=S.NONE),
    "nyu_door_opening_surprising_effectiveness": _spec(None, wrist="image", state=S.NONE),
    "viola": _spec("agentview_rgb", wrist="eye_in_hand_rgb", state=S.JOINT),
    "berkeley_autolab_ur5": _spec("image", wrist="hand_image", state=S.POS_QUAT),
    "toto": _spec("image", state=S.JOINT),
    "language_table": _spec("rgb"),
    "columbia_cairlab_pusht_real": _spec("image", wrist="wrist_image"),
    "stanford_kuka_multimodal_dataset_converted_externally_to_rlds": _spec("image", state=S.POS_QUAT),
    "nyu_rot_dataset_converted_externally_to_rlds": _spec("image"),
    "stanford_hydra_dataset_converted_externally_to_rlds": _spec("image", wrist="wrist_image"),
    "austin_buds_dataset_converted_externally_to_rlds": _spec("image", wrist="wrist_image", state=S.JOINT),
    "nyu_franka_play_dataset_converted_externally_to_rlds": _spec("image", "image_additional_view"),
    "maniskill_dataset_converted_externally_to_rlds": _spec("image", wrist="wrist_image", state=S.POS_QUAT),
    "furniture_bench_dataset_converted_externally_to_rlds": _spec("image", wrist="wrist_image", state=S.POS_QUAT),
    "cmu_franka_exploration_dataset_converted_externally_to_rlds": _spec("highres_image", state=S.NONE),
    "ucsd_kitchen_dataset_converted_externally_to_rlds": _spec("image", state=S.JOINT),
    "ucsd_pick_and_place_dataset_converted_externally_to_rlds": _spec("image"),
    "austin_sailor_dataset_converted_externally_to_rlds": _spec("image", wrist="wrist_image", state=S.POS_QUAT),
    "austin_sirius_dataset_converted_externally_to_rlds": _spec("image", wrist="wrist_image", state=S.POS_QUAT),
    "bc_z": _spec("image"),
    "utokyo_pr2_opening_fridge_converted_externally_to_rlds": _spec("image"),
    "utokyo_pr2_tabletop_manipulation_converted_externally_to_rlds": _spec("image"),
    "utokyo_xarm_pick_and_place_converted_externally_to_rlds": _spec("image", "image2", "hand_image"),
    "utokyo_xarm_bimanual_converted_externally_to_rlds": _spec("image"),
    "robo_net": _spec("image", "image1"),
    "berkeley_mvp_converted_externally_to_rlds": _spec(None, wrist="hand_image", state=S.POS_QUAT, action=A.JOINT_POS),
    "berkeley_rpt_converted_externally_to_rlds": _spec(None, wrist="hand_image", state=S.JOINT, action=A.JOINT_POS),
    "kaist_nonprehensile_converted_externally_to_rlds": _spec("image", state=S.POS_QUAT),
    "stanford_mask_vit_converted_externally_to_rlds": _spec("image"),
    "tokyo_u_lsmo_converted_externally_to_rlds": _spec("image"),
    "dlr_sara_pour_converted_externally_to_rlds": _spec("image"),
    "dlr_sara_grid_clamp_converted_externally_to_rlds": _spec("image"),
    "dlr_edan_shared_control_converted_externally_to_rlds": _spec("image"),
    "asu_table_top_converted_externally_to_rlds": _spec("image"),
    "stanford_robocook_converted_externally_to_rlds": _spec("image_1", "image_2"),
    "imperialcollege_sawyer_wrist_cam": _spec("image", wrist="wrist_image", state=S.NONE),
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": _spec("image", wrist="wrist_image", state=S.JOINT),
    "uiuc_d3field": _spec("image_1", "image_2", state=S.NONE),
    "utaustin_mutex": _spec("image", wrist="wrist_image", state=S.JOINT),
    "berkeley_fanuc_manipulation": _spec("image", wrist="wrist_image", state=S.JOINT),
    "cmu_playing_with_food": _spec("image", wrist="finger_vision_1"),
    "cmu_play_fusion": _spec("image", state=S.JOINT),
    "cmu_stretch": _spec("image"),
    "berkeley_gnm_recon": _spec(None, wrist="image"),
    "berkeley_gnm_cory_hall": _spec(None, wrist="image"),
    "berkeley_gnm_sac_son": _spec(None, wrist="image"),
    "droid": _spec("exterior_image_1_left", "exterior_image_2_left", "wrist_image_left", state=S.POS_QUAT,
                   drop_zero_motion=True),
    "fmb_dataset": _spec("image_side_1", "image_side_2", "image_wrist_1"),
    "dobbe": _spec("wrist_image"),
    "roboset": _spec("image_left", "image_right", "image_wrist", state=S.JOINT, action=A.JOINT_POS),
    "rh20t": _spec("image_front", "image_side_right", "image_wrist"),
    **{f"tdroid_{task}": _spec("static_image") for task in (
        "carrot_in_bowl", "pour_corn_in_pot", "flip_pot_upright", "move_object_onto_plate", "knock_object_over",
        "cover_object_with_towel")},
    "droid_wipe": _spec("exterior_image_2_left", wrist="wrist_image_left", drop_zero_motion=True),
    # LIBERO (OpenVLA's and OFT's fine-tuning suites, no-op steps removed): EEF_POS actions, 8-D proprio.
    **{f"libero_{suite}_no_noops": _spec("image", wrist="wrist_image") for suite in ("spatial", "object", "goal", "10")},
}



def _eef_pad_gripper(key: str = "state", eef: tuple = (0, 6), gripper: tuple = (-1, None)) -> tuple:
    """The most common state layout: EEF xyz + rpy columns of one field, a zero pad, the gripper column."""
    return (obs(key, *eef), None, obs(key, *gripper))


_PAD8 = (None,) * 8  # datasets that record no usable state: eight zero columns, as upstream
_EEF_PAD_GRIPPER = ("EEF_state", None, "gripper_state")  # keys the Bridge / LIBERO transforms write
# Proprio of every dataset: upstream's state_obs_keys, with the columns its transforms cut written as
# recipe Parts here (so the standardization transforms only touch actions).
_STATE_KEYS = {
    "ovla_tabletop": ("state",),  # [x, y, gripper]
    "fractal20220817_data": ("base_pose_tool_reached", "gripper_closed"),
    "kuka": (zlib_floats("clip_function_input/base_pose_tool_reached", 7), zlib_floats("gripper_closed", 1)),
    "bridge_oxe": _EEF_PAD_GRIPPER,
    "bridge_orig": _EEF_PAD_GRIPPER,
    "bridge_dataset": _EEF_PAD_GRIPPER,
    "taco_play": (obs("robot_obs", 0, 6), None, obs("robot_obs", 7, 8)),
    "jaco_play": _eef_pad_gripper("end_effector_cartesian_pos"),
    "berkeley_cable_routing": ("robot_state", None),
    "roboturk": _PAD8,
    "nyu_door_opening_surprising_effectiveness": _PAD8,
    "viola": ("joint_states", "gripper_states"),
    "berkeley_autolab_ur5": (obs("robot_state", 6, 14),),
    "toto": ("state", None),
    "language_table": ("effector_translation",) + (None,) * 6,
    "columbia_cairlab_pusht_real": ("robot_state",) + (None,) * 6,
    "stanford_kuka_multimodal_dataset_converted_externally_to_rlds": ("ee_position", "ee_orientation", None),
    "nyu_rot_dataset_converted_externally_to_rlds": _eef_pad_gripper(),
    "stanford_hydra_dataset_converted_externally_to_rlds": (obs("state", 0, 3), obs("state", 7, 10), None,
                                                            obs("state", -3, -2)),
    "austin_buds_dataset_converted_externally_to_rlds": (obs("state", 0, 8),),
    "nyu_franka_play_dataset_converted_externally_to_rlds": (obs("state", -6, None), None, None),
    "maniskill_dataset_converted_externally_to_rlds": ("tcp_pose", obs("state", 7, 8)),
    "furniture_bench_dataset_converted_externally_to_rlds": (obs("state", 0, 7), obs("state", -1, None)),
    "cmu_franka_exploration_dataset_converted_externally_to_rlds": _PAD8,
    "ucsd_kitchen_dataset_converted_externally_to_rlds": (obs("state", 0, 7), None),
    "ucsd_pick_and_place_dataset_converted_externally_to_rlds": _eef_pad_gripper(),
    "austin_sailor_dataset_converted_externally_to_rlds": ("state",),
    "austin_sirius_dataset_converted_externally_to_rlds": ("state",),
    "bc_z": ("present/xyz", "present/axis_angle", None, "present/sensed_close"),
    "utokyo_pr2_opening_fridge_converted_externally_to_rlds": _eef_pad_gripper(),
    "utokyo_pr2_tabletop_manipulation_converted_externally_to_rlds": _eef_pad_gripper(),
    "utokyo_xarm_pick_and_place_converted_externally_to_rlds": ("end_effector_pose", None, None),
    "utokyo_xarm_bimanual_converted_externally_to_rlds": ("pose_r", None, None),
    "robo_net": (obs("state", 0, 4), zeros(2), None, obs("state", -1, None)),
    "berkeley_mvp_converted_externally_to_rlds": ("pose", "gripper"),
    "berkeley_rpt_converted_externally_to_rlds": ("joint_pos", "gripper"),
    "kaist_nonprehensile_converted_externally_to_rlds": (obs("state", -7, None), None),
    "stanford_mask_vit_converted_externally_to_rlds": (obs("end_effector_pose", 0, 4), zeros(2), None,
                                                       obs("end_effector_pose", -1, None)),
    "tokyo_u_lsmo_converted_externally_to_rlds": _eef_pad_gripper(),
    "dlr_sara_pour_converted_externally_to_rlds": ("state", None, None),
    "dlr_sara_grid_clamp_converted_externally_to_rlds": (obs("state", 0, 6), None, None),
    "dlr_edan_shared_control_converted_externally_to_rlds": ("state", None),
    "asu_table_top_converted_externally_to_rlds": (field("ground_truth_states/EE"), None, obs("state", -1, None)),
    "stanford_robocook_converted_externally_to_rlds": _eef_pad_gripper(),
    "imperialcollege_sawyer_wrist_cam": (None,) * 7 + ("state",),
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": (obs("state", 0, 7), obs("state", 7, 8)),
    "uiuc_d3field": _PAD8,
    "utaustin_mutex": (obs("state", 0, 8),),
    "berkeley_fanuc_manipulation": _eef_pad_gripper(eef=(0, 6), gripper=(6, 7)),
    "cmu_playing_with_food": ("state", None, None),
    "cmu_play_fusion": ("state",),
    "cmu_stretch": (obs("state", 0, 3), zeros(3), None, obs("state", -1, None)),
    **{name: ("position", zeros(3), "yaw", None, None)
       for name in ("berkeley_gnm_recon", "berkeley_gnm_cory_hall", "berkeley_gnm_sac_son")},
    "droid": ("cartesian_position", "gripper_position"),
    "droid_wipe": ("cartesian_position", "gripper_position"),
    "fmb_dataset": ("eef_pose", "state_gripper_pose"),
    "dobbe": ("state",),
    "roboset": ("state",),
    "rh20t": ("tcp_base", "gripper_width"),
    **{f"tdroid_{task}": (obs("cartesian_position", 0, 6), None, obs("gripper_position", -1, None)) for task in (
        "carrot_in_bowl", "pour_corn_in_pot", "flip_pot_upright", "move_object_onto_plate", "knock_object_over",
        "cover_object_with_towel")},
    # OFT's LIBERO proprio: 6 EEF dims + the 2 gripper joints, no pad (8-D).
    **{f"libero_{suite}_no_noops": ("EEF_state", "gripper_state") for suite in ("spatial", "object", "goal", "10")},
}

REGISTRY: dict[str, DatasetSpec] = {
    name: DatasetSpec(name=name, **{**fields, "standardize": T.STANDARDIZE.get(name),
                                    "state_keys": _STATE_KEYS.get(name, ())}) for name, fields in _TABLE.items()}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset (e.g. the built-in demo dataset or a user's own) to the registry."""
    REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> DatasetSpec:
    if name not in REGISTRY:
        close = sorted(n for n in REGISTRY if n.split("_")[0] == name.split("_")[0])[:5]
        hint = f"; similar: {close}" if close else ""
        raise DataError(f"unknown dataset {name!r}: not in the OXE registry ({len(REGISTRY)} datasets){hint}; "
                        f"declare your own with --dataset-spec FILE (see the README, 'Fine-tune on your own data')")
    spec = REGISTRY[name]
    if spec.standardize is None:
        raise DataError(f"dataset {name!r}: its standardization transform is not implemented yet "
                        f"(ovla_jax/data/oxe/transforms.py)")
    return spec
