"""Where training metrics go: TensorBoard event files and ``metrics.jsonl`` (process 0 only; the
workdir may be a ``gs://`` URL), W&B when configured and installed, and the console.

On a terminal the console shows a tqdm bar (step, steps/s, ETA; loss, accuracy in its postfix). A
bar redraws with carriage returns, which in a log file (CI, launch scripts, SLURM, ``tee``) is one
endless line, so unless both stdout and stderr are terminals a plain progress line is printed (on
stdout) at each metrics write (every ``log_every`` steps) instead.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Optional

import numpy as np

from ovla_jax import fileio

log = logging.getLogger(__name__)


def summarize(sums: dict, dataset_names: list[str], prefix: str = "") -> dict:
    """Summed step metrics -> means: loss per labelled token, accuracy and L1 per action token, overall
    and per dataset (``<prefix>loss``, ``<prefix>bridge/accuracy``, ...)."""
    out = {}
    tokens, actions = max(float(sums["tokens_sum"]), 1.0), max(float(sums["action_tokens_sum"]), 1.0)
    out[prefix + "loss"] = float(sums["loss_sum"]) / tokens
    out[prefix + "accuracy"] = float(sums["correct_sum"]) / actions
    out[prefix + "l1"] = float(sums["l1_sum"]) / actions
    for kind, count in (("dim", "dim_count_sum"), ("step", "step_count_sum")):  # chunked (OFT) models
        if f"l1_{kind}_sum" in sums:
            per = np.asarray(sums[f"l1_{kind}_sum"]) / np.maximum(np.asarray(sums[count]), 1.0)
            out.update({f"{prefix}l1_{kind}/{i}": float(v) for i, v in enumerate(per)})
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


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def progress_line(step: int, total: int, scalars: dict, elapsed: float, steps_done: int) -> str:
    """``step 120/1000 (12.0%) | 3.41 steps/s | ETA 00:04:18 | loss 4.1234 | acc 0.120``: steps/s, loss
    and accuracy of the last logging window (steps/s over the whole run when the window has none)."""
    rate = scalars.get("train/steps_per_second") or (steps_done / elapsed if elapsed > 0 and steps_done else 0.0)
    eta = _duration((total - step) / rate) if rate else "?"
    parts = [f"step {step}/{total} ({100.0 * step / max(total, 1):.1f}%)", f"{rate:.2f} steps/s", f"ETA {eta}"]
    if "train/loss" in scalars:
        parts.append(f"loss {scalars['train/loss']:.4f}")
    if "train/accuracy" in scalars:
        parts.append(f"acc {scalars['train/accuracy']:.3f}")
    return " | ".join(parts)


class Reporter:
    def __init__(self, workdir: str, *, total_steps: int, start_step: int, enabled: bool = True,
                 wandb_project: str = "", wandb_config: Optional[dict] = None, progress: bool = True,
                 interactive: Optional[bool] = None):
        self.enabled = enabled
        self.bar = self.tb = self.wandb = self.jsonl = None
        self.history: list[dict] = []
        self.total, self.start, self.started = total_steps, start_step, time.time()
        self.lines = False  # plain progress lines instead of a bar
        if not enabled:
            return
        import tensorflow as tf
        from tqdm import tqdm

        self.tb = tf.summary.create_file_writer(fileio.join(workdir, "tensorboard"))
        self.jsonl = fileio.LineLog(fileio.join(workdir, "metrics.jsonl"))  # one JSON object per write
        if interactive is None:  # the bar draws on stderr; a redirected stdout (| tee, a log file) wants lines
            interactive = sys.stderr.isatty() and sys.stdout.isatty()
        if progress and interactive:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train", dynamic_ncols=True)
        self.lines = progress and not interactive
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
        self.jsonl.write(json.dumps(self.history[-1]))
        with self.tb.as_default(step=step):
            for k, v in scalars.items():
                tf.summary.scalar(k, v)
        self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)
        if self.bar and "train/loss" in scalars:
            self.bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", acc=f"{scalars['train/accuracy']:.3f}",
                                 refresh=False)
        if self.lines and "train/loss" in scalars:
            print(progress_line(step, self.total, scalars, time.time() - self.started, step - self.start), flush=True)

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
