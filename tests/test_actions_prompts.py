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


def test_hf_tokenizer_dirs_load_without_transformers_as_llama_fast_tokenizers_did(tmp_path):
    """tokenizer.json through the tokenizers library: BOS per add_bos_token (no EOS), the "▁" empty token
    looked up in the vocabulary, special tokens given as strings or {"content": ...} objects."""
    import json
    import subprocess
    import sys

    from ovla_jax.prompts import vla_prompt
    from ovla_jax.tokenizer import HFTokenizer, make_tokenizer, write_llama_style_tokenizer

    texts = [vla_prompt(f"{verb} the {color} block") for verb in ("pick up", "push", "lift")
             for color in ("red", "blue", "green")]
    write_llama_style_tokenizer(str(tmp_path / "tok"), texts, vocab_size=120)
    tok = make_tokenizer(str(tmp_path / "tok"), vocab_size=384)
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id, tok.vocab_size, tok.pad_id) == (1, 2, 384, 384)
    ids = tok.encode(vla_prompt("pick up the red block"))
    assert ids[0] == 1 and 2 not in ids and 0 not in ids  # BOS, no EOS, every piece known
    assert tok.empty_token_id is not None and tok.empty_token_id == tok._tok.token_to_id("\u2581")
    assert tok._tok.decode(ids[1:]) == vla_prompt("pick up the red block").rstrip()
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, bos_token={"content": "<s>", "lstrip": False}, pad_token="</s>")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    plain = HFTokenizer(str(tmp_path / "tok"))
    assert plain.encode(vla_prompt("pick up the red block")) == ids[1:] and plain.bos_id == 1 and plain.pad_id == 2
    probe = (f"import sys; from ovla_jax.tokenizer import HFTokenizer; HFTokenizer({str(tmp_path / 'tok')!r}).encode('x'); "
             f"print('transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]  # neither is imported to tokenize
