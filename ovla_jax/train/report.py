"""Where training metrics go: TensorBoard event files and ``metrics.jsonl`` (process 0), W&B when
configured and installed, and a console progress bar (step, steps/s, ETA from tqdm; loss, accuracy in its postfix)."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)


def summarize(sums: dict, dataset_names: list[str], prefix: str = "") -> dict:
    """Summed step metrics -> means: loss per labelled token, accuracy and L1 per action token, overall
    and per dataset (``<prefix>loss``, ``<prefix>bridge/accuracy``, ...)."""
    out = {}
    tokens, actions = max(float(sums["tokens_sum"]), 1.0), max(float(sums["action_tokens_sum"]), 1.0)
    out[prefix + "loss"] = float(sums["loss_sum"]) / tokens
    out[prefix + "accuracy"] = float(sums["correct_sum"]) / actions
    out[prefix + "l1"] = float(sums["l1_sum"]) / actions
    if len(dataset_names) > 1:
        t = np.maximum(np.asarray(sums["per_dataset/tokens_sum"]), 1.0)
        a = np.maximum(np.asarray(sums["per_dataset/action_tokens_sum"]), 1.0)
        for i, name in enumerate(dataset_names):
            if np.asarray(sums["per_dataset/tokens_sum"])[i] == 0:
                continue
            out[f"{prefix}{name}/loss"] = float(np.asarray(sums["per_dataset/loss_sum"])[i] / t[i])
            out[f"{prefix}{name}/accuracy"] = float(np.asarray(sums["per_dataset/correct_sum"])[i] / a[i])
            out[f"{prefix}{name}/l1"] = float(np.asarray(sums["per_dataset/l1_sum"])[i] / a[i])
    return out


class Reporter:
    def __init__(self, workdir: str, *, total_steps: int, start_step: int, enabled: bool = True,
                 wandb_project: str = "", wandb_config: Optional[dict] = None, progress: bool = True):
        self.enabled = enabled
        self.bar = self.tb = self.wandb = self.jsonl = None
        self.history: list[dict] = []
        if not enabled:
            return
        import tensorflow as tf
        from tqdm import tqdm

        self.tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # one JSON object per write
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train", dynamic_ncols=True)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("wandb.project is set but wandb is not installed; logging to TensorBoard only")
            else:
                self.wandb = wandb.init(project=wandb_project, config=wandb_config, dir=workdir, resume="allow")

    def advance(self, steps: int = 1) -> None:
        if self.bar:
            self.bar.update(steps)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        import tensorflow as tf

        self.history.append({"step": step, **scalars})
        self.jsonl.write(json.dumps(self.history[-1]) + "\n")
        self.jsonl.flush()
        with self.tb.as_default(step=step):
            for k, v in scalars.items():
                tf.summary.scalar(k, v)
        self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)
        if self.bar and "train/loss" in scalars:
            self.bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", acc=f"{scalars['train/accuracy']:.3f}",
                                 refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()
            self.jsonl.close()
        if self.wandb:
            self.wandb.finish()
