"""Offline evaluation on recorded data: how close a policy's actions come to the demonstrations of a
held-out split, when closed-loop evaluation would need the user's robot.

Frames come from the training pipeline itself (same resize, cameras, proprio normalization), so the
policy sees exactly what it was trained on. Reported, over every frame of the split (or ``max_batches``):
- ``l1``: mean |predicted - demonstrated| of the first action, per dim, in the dataset's units, and
  ``l1_normalized`` in the model's normalized units;
- ``token_accuracy`` (token heads): the fraction of action tokens (256 bins per dim) equal to the
  demonstration's, decoded greedily (no teacher forcing);
- ``chunk_l1`` (chunked heads): the same L1 over every valid step of the predicted chunk.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ovla_jax import actions as A


def evaluate(policy, data_dir: str, dataset: str, split: str = "val", *, batch_size: int = 16,
             max_batches: Optional[int] = None, dataset_specs=(), stats_cache_dir: Optional[str] = None,
             progress: bool = True) -> dict:
    from ovla_jax.data.pipeline import DataConfig, make_frames, numpy_batches
    from ovla_jax.data.stats import DEFAULT_CACHE
    from ovla_jax.policy import pick_stats

    cfg = policy.config
    data = DataConfig(data_dir=data_dir, mixture=dataset, image_size=policy.image_size, towers=policy.towers,
                      future=cfg.chunk - 1 if cfg.parallel else 0, augment=False, shuffle_buffer=1,
                      normalization=policy.normalization, wrist=cfg.num_images > 1, proprio=cfg.proprio_dim > 0,
                      threads=4, stats_cache_dir=stats_cache_dir or DEFAULT_CACHE, dataset_specs=tuple(dataset_specs))
    frames, _ = make_frames(data, split, train=False)
    # Unnormalize with the policy's own statistics of this dataset: what deployment would use.
    stats = pick_stats(policy.norm_stats, dataset if dataset in policy.norm_stats else None)
    sums = {"l1": 0.0, "l1_normalized": 0.0, "token_hits": 0.0, "chunk_l1": 0.0, "chunk_l1_normalized": 0.0}
    n_frames = n_chunk = 0
    batches = numpy_batches(frames, batch_size, drop_remainder=False)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"offline eval on {dataset}/{split}", unit="frame")
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        cameras = batch["image"][:, -1]
        if cfg.num_images > 1:
            cameras = np.concatenate([cameras, batch["image_wrist"][:, -1]], axis=-1)
        instructions = [s.decode() for s in batch["task"]["language_instruction"]]
        predicted = policy.predict_normalized(cameras, instructions, batch.get("proprio"))
        truth = batch["action"]  # [B, 1 + F, D], normalized
        first_pred = predicted[:, 0] if predicted.ndim == 3 else predicted
        first_true = truth[:, 0, :first_pred.shape[-1]]
        sums["l1_normalized"] += np.abs(first_pred - first_true).sum(0)
        sums["l1"] += np.abs(A.unnormalize(first_pred, stats, policy.normalization)
                             - A.unnormalize(first_true, stats, policy.normalization)).sum(0)
        if cfg.action_head in ("tokens", "parallel-tokens"):
            vocab, bins = cfg.tokenizer_vocab_size, cfg.n_action_bins
            pred_tokens = A.encode_actions(predicted, vocab, bins)
            true_tokens = A.encode_actions(truth[:, :predicted.shape[1]] if predicted.ndim == 3 else first_true, vocab, bins)
            valid = batch["action_pad_mask"][:, :predicted.shape[1], None] if predicted.ndim == 3 else 1
            sums["token_hits"] += float(((pred_tokens == true_tokens) * valid).sum())
        if predicted.ndim == 3:
            k = predicted.shape[1]
            valid = batch["action_pad_mask"][:, :k, None].astype(np.float32)
            diff_n = np.abs(predicted - truth[:, :k]) * valid
            diff = np.abs(A.unnormalize(predicted, stats, policy.normalization)
                          - A.unnormalize(truth[:, :k], stats, policy.normalization)) * valid
            sums["chunk_l1_normalized"] += diff_n.sum((0, 1))
            sums["chunk_l1"] += diff.sum((0, 1))
            n_chunk += float(valid.sum())
        n_frames += len(instructions)
        if bar is not None:
            bar.update(len(instructions))
    if bar is not None:
        bar.close()
    if not n_frames:
        from ovla_jax.data.errors import DataError

        raise DataError(f"dataset {dataset!r}: split {split!r} gave no frames to evaluate on")
    dims = np.asarray(sums["l1"]).shape[0]
    out = {"dataset": dataset, "split": split, "frames": n_frames, "action_head": cfg.action_head,
           "l1": (np.asarray(sums["l1"]) / n_frames).tolist(),
           "l1_normalized": (np.asarray(sums["l1_normalized"]) / n_frames).tolist()}
    out["l1_mean"] = float(np.mean(out["l1"]))
    out["l1_normalized_mean"] = float(np.mean(out["l1_normalized"]))
    if cfg.action_head in ("tokens", "parallel-tokens"):  # n_chunk: valid (frame, step) pairs of the chunks
        out["token_accuracy"] = float(sums["token_hits"] / ((n_chunk if cfg.parallel else n_frames) * dims))
    if cfg.parallel:
        out["chunk"] = cfg.chunk
        out["chunk_l1"] = (np.asarray(sums["chunk_l1"]) / n_chunk).tolist()
        out["chunk_l1_normalized_mean"] = float(np.sum(sums["chunk_l1_normalized"]) / (n_chunk * dims))
    return out


def format_report(r: dict) -> str:
    lines = [f"offline evaluation: {r['dataset']} / {r['split']}, {r['frames']} frames, head {r['action_head']}",
             f"  L1 of the first action (dataset units), per dim: {np.round(r['l1'], 5).tolist()}",
             f"  L1 mean: {r['l1_mean']:.5f} (normalized units: {r['l1_normalized_mean']:.4f})"]
    if "token_accuracy" in r:
        lines.append(f"  token accuracy: {r['token_accuracy']:.3f}")
    if "chunk_l1" in r:
        lines.append(f"  chunk L1 (all {r['chunk']} steps, dataset units), per dim: {np.round(r['chunk_l1'], 5).tolist()}"
                     f" (normalized mean {r['chunk_l1_normalized_mean']:.4f})")
    return "\n".join(lines)
