"""Action tokenization and normalization against the official formulas written out with numpy."""
import jax.numpy as jnp
import numpy as np
import pytest

from ovla_jax import actions, prompts


def _official_encode(a, vocab):
    bins = np.linspace(-1, 1, 256)
    return vocab - np.digitize(np.clip(a, -1, 1), bins)


def _official_decode(tokens, vocab):
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2.0
    return centers[np.clip(vocab - tokens - 1, 0, centers.shape[0] - 1)]


@pytest.mark.parametrize("vocab", [32000, 320])
def test_encode_decode_match_official_formulas(vocab):
    a = np.concatenate([np.linspace(-1.2, 1.2, 1001), [-1.0, 1.0, 0.0]]).astype(np.float32)
    np.testing.assert_array_equal(actions.encode_actions(a, vocab), _official_encode(a, vocab))
    tokens = _official_encode(a, vocab)
    np.testing.assert_allclose(actions.decode_action_tokens(tokens, vocab), _official_decode(tokens, vocab), atol=1e-7)
    assert actions.is_action_token(tokens, vocab).all()
    # jax computes in float32: identical except for inputs within float32 rounding of a bin edge.
    off_edge = np.abs(a[:, None] - np.linspace(-1, 1, 256)[None]).min(1) > 1e-6
    np.testing.assert_array_equal(np.asarray(actions.encode_actions(jnp.asarray(a), vocab, xp=jnp))[off_edge], tokens[off_edge])


def test_round_trip_within_one_bin():
    a = np.random.default_rng(0).uniform(-1, 1, (100, 7)).astype(np.float32)
    back = actions.decode_action_tokens(actions.encode_actions(a))
    assert np.abs(back - a).max() <= 2.0 / 255 + 1e-6


def test_bounds_q99_respects_mask_and_inverts():
    stats = {"q01": np.array([-2.0, 0.0, 1.0]), "q99": np.array([2.0, 4.0, 3.0]), "mask": [True, True, False]}
    a = np.array([[0.0, 2.0, 0.7], [10.0, -10.0, 0.2]], np.float32)
    n = actions.normalize_bounds_q99(a, stats)
    np.testing.assert_allclose(n[0], [0.0, 0.0, 0.7], atol=1e-6)
    np.testing.assert_allclose(n[1], [1.0, -1.0, 0.2], atol=1e-6)  # clipped; gripper untouched
    np.testing.assert_allclose(actions.unnormalize_bounds_q99(n[:1], stats), a[:1], atol=1e-5)
    with pytest.raises(KeyError, match="q99"):
        actions.normalize_bounds_q99(a, {"q01": [0, 0, 0]})


def test_normal_normalization_inverts():
    stats = {"mean": np.array([1.0, -1.0]), "std": np.array([2.0, 0.5])}
    a = np.array([[3.0, 0.0]], np.float32)
    n = actions.normalize_normal(a, stats)
    np.testing.assert_allclose(n, [[1.0, 2.0]], atol=1e-6)
    np.testing.assert_allclose(actions.unnormalize_normal(n, stats), a, atol=1e-6)


def test_prompt_and_empty_token_rule():
    assert prompts.vla_prompt("Put the Spoon in the POT") == "In: What action should the robot take to put the spoon in the pot?\nOut:"
    assert prompts.vla_prompt_with_space("x").endswith("Out: ")
    assert prompts.ensure_trailing_empty_token([1, 5]) == [1, 5, 29871]
    assert prompts.ensure_trailing_empty_token([1, 5, 29871]) == [1, 5, 29871]


def test_normalizations_by_name_round_trip_and_bounds_uses_min_max():
    import numpy as np

    from ovla_jax import actions as A

    stats = {"q01": [-1.0, -1.0], "q99": [1.0, 1.0], "min": [-2.0, -2.0], "max": [2.0, 2.0],
             "mean": [0.0, 0.0], "std": [2.0, 2.0]}
    x = np.array([0.5, -0.5], np.float32)
    assert np.allclose(A.normalize(x, stats, "bounds"), [0.25, -0.25])  # OFT's ALOHA: min/max, not q01/q99
    for kind in A.NORMALIZATIONS:
        assert np.allclose(A.unnormalize(A.normalize(x, stats, kind), stats, kind), x, atol=1e-6)
    import pytest

    with pytest.raises(ValueError, match="normalization"):
        A.normalize(x, stats, "minmax")
