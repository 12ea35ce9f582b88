"""The demo's pictures: a loss curve and a filmstrip of closed-loop rollouts (matplotlib, Agg)."""
from __future__ import annotations

import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def loss_curve(path: str, history: list[dict]) -> str:
    """Train (and validation) loss per step from ``metrics.jsonl`` rows."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, style in (("train/loss", "-"), ("val/loss", "o--")):
        rows = [(h["step"], h[key]) for h in history if key in h]
        if rows:
            steps, values = zip(*rows)
            ax.plot(steps, values, style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per action token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("ovla-jax demo: training loss")
    path = _save(fig, path)
    plt.close(fig)
    return path


def filmstrip(path: str, episodes, frames_per_row: int = 8) -> str:
    """One row per recorded episode: evenly spaced frames, titled with the instruction and outcome."""
    plt = _plt()
    rows = max(1, len(episodes))
    fig, axes = plt.subplots(rows, frames_per_row, figsize=(frames_per_row * 1.3, rows * 1.6), squeeze=False)
    for r in range(rows):
        for c in range(frames_per_row):
            axes[r][c].axis("off")
        if r >= len(episodes):
            continue
        ep = episodes[r]
        index = np.unique(np.linspace(0, len(ep.frames) - 1, frames_per_row).round().astype(int))
        for c, i in enumerate(index):
            axes[r][c].imshow(ep.frames[i], interpolation="nearest")
            axes[r][c].set_title(f"t={i}", fontsize=7)
        outcome = "success" if ep.success else "failure"
        axes[r][0].text(0, -14, f"{ep.instruction!r}: {outcome} in {ep.steps} steps", fontsize=8)
    fig.suptitle("ovla-jax demo: trained policy, closed loop", fontsize=9)
    path = _save(fig, path)
    plt.close(fig)
    return path
