"""Named dataset mixtures: (dataset, sampling weight) lists, as published with OpenVLA.

Sampling probability = weight x num_transitions, normalized over the mixture (duplicates dropped, the
first weight kept). ``oxe_magic_soup_plus_minus`` is the mixture OpenVLA-7B was trained on.
"""
from __future__ import annotations

from ovla_jax.data.errors import DataError

_MAGIC_SOUP_BASE = [
    ("kuka", 0.8341046294), ("bridge_orig", 1.0), ("taco_play", 2.0), ("jaco_play", 1.0),
    ("berkeley_cable_routing", 1.0), ("roboturk", 2.0), ("viola", 2.0), ("berkeley_autolab_ur5", 2.0), ("toto", 1.0),
]
_MAGIC_SOUP_TAIL = [
    ("stanford_hydra_dataset_converted_externally_to_rlds", 2.0),
    ("austin_buds_dataset_converted_externally_to_rlds", 1.0),
    ("nyu_franka_play_dataset_converted_externally_to_rlds", 3.0),
    ("furniture_bench_dataset_converted_externally_to_rlds", 0.1),
    ("ucsd_kitchen_dataset_converted_externally_to_rlds", 2.0),
    ("austin_sailor_dataset_converted_externally_to_rlds", 1.0),
    ("austin_sirius_dataset_converted_externally_to_rlds", 1.0),
    ("dlr_edan_shared_control_converted_externally_to_rlds", 1.0),
    ("iamlab_cmu_pickup_insert_converted_externally_to_rlds", 1.0),
    ("utaustin_mutex", 1.0), ("berkeley_fanuc_manipulation", 2.0), ("cmu_stretch", 1.0),
]
_RTX = [("fractal20220817_data", 0.54087122203), ("kuka", 0.8341046294), ("bridge_orig", 1.0), ("taco_play", 2.0),
        ("jaco_play", 2.0), ("berkeley_cable_routing", 3.0), ("roboturk", 1.0), ("viola", 2.0),
        ("berkeley_autolab_ur5", 1.0), ("toto", 1.0)]

MIXTURES: dict[str, list[tuple[str, float]]] = {
    "bridge": [("bridge_orig", 1.0)],
    "bridge_dataset": [("bridge_dataset", 1.0)],
    "bridge_rt_1": [("bridge_orig", 1.0), ("fractal20220817_data", 1.0)],
    "rtx": _RTX,
    "rtx_franka": _RTX + [
        ("taco_play", 1.0), ("berkeley_cable_routing", 1.0), ("viola", 1.0), ("toto", 1.0),
        ("stanford_hydra_dataset_converted_externally_to_rlds", 1.0),
        ("austin_buds_dataset_converted_externally_to_rlds", 3.0),
        ("nyu_franka_play_dataset_converted_externally_to_rlds", 3.0),
        ("maniskill_dataset_converted_externally_to_rlds", 0.1),
        ("furniture_bench_dataset_converted_externally_to_rlds", 0.1),
        ("cmu_franka_exploration_dataset_converted_externally_to_rlds", 5.0),
        ("austin_sailor_dataset_converted_externally_to_rlds", 1.0),
        ("austin_sirius_dataset_converted_externally_to_rlds", 1.0),
        ("berkeley_rpt_converted_externally_to_rlds", 1.0),
        ("kaist_nonprehensile_converted_externally_to_rlds", 3.0),
        ("stanford_robocook_converted_externally_to_rlds", 1.0),
        ("iamlab_cmu_pickup_insert_converted_externally_to_rlds", 1.0),
        ("utaustin_mutex", 1.0), ("cmu_play_fusion", 1.0)],
    "oxe_magic_soup": [("fractal20220817_data", 0.54087122203)] + _MAGIC_SOUP_BASE + [("language_table", 0.1)]
    + _MAGIC_SOUP_TAIL,
    "oxe_magic_soup_plus": [("fractal20220817_data", 0.54087122203)] + _MAGIC_SOUP_BASE + [("language_table", 0.1)]
    + _MAGIC_SOUP_TAIL + [("bc_z", 0.2), ("fmb_dataset", 1.0), ("dobbe", 0.2), ("droid", 0.06)],
    "oxe_magic_soup_plus_minus": [("fractal20220817_data", 1.0)] + _MAGIC_SOUP_BASE + _MAGIC_SOUP_TAIL
    + [("bc_z", 0.2), ("fmb_dataset", 1.0), ("dobbe", 0.2)],
    **{f"tdroid_{t}": [(f"tdroid_{t}", 1.0)] for t in (
        "carrot_in_bowl", "pour_corn_in_pot", "flip_pot_upright", "move_object_onto_plate", "knock_object_over",
        "cover_object_with_towel")},
    "droid_wipe": [("droid_wipe", 1.0)],
    **{f"libero_{suite}_no_noops": [(f"libero_{suite}_no_noops", 1.0)] for suite in ("spatial", "object", "goal", "10")},
}


def get_mixture(name: str) -> list[tuple[str, float]]:
    """The (dataset, weight) list of a named mixture, duplicates dropped (first weight kept)."""
    if name not in MIXTURES:
        raise DataError(f"unknown mixture {name!r}; known: {sorted(MIXTURES)}")
    seen, out = set(), []
    for dataset, weight in MIXTURES[name]:
        if dataset not in seen:
            seen.add(dataset)
            out.append((dataset, weight))
    return out
