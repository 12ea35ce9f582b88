"""Closed-loop evaluation on the built-in tabletop tasks: any policy, many seeded episodes at once,
per-task success rates with Wilson 95% confidence intervals.

A policy is ``fn(observations, instructions list[str], envs) -> float[B, 7]`` or, for chunked (OFT)
policies, ``float[B, K, 7]``; ``observations`` holds batched ``image`` (third-person), ``wrist_image``
uint8[B, S, S, 3] and ``state`` float32[B, 3]. The VLA sees only those and the words; the expert reads
the true state from ``envs``. A chunk is executed open loop, ``execute`` steps of it (all by default)
before the policy is asked again. All episodes step together as one fixed-size batch (finished ones
keep being fed, their actions ignored), so a jitted policy compiles once.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

from ovla_jax.sim.tabletop import TASKS, Tabletop, WorldConfig

EVAL_SEED_OFFSET = 2 * 10**6  # disjoint from the demo dataset's train and val seeds
Policy = Callable[[np.ndarray, list, list], np.ndarray]


@dataclasses.dataclass
class Episode:
    task: str
    seed: int
    instruction: str
    success: bool
    steps: int
    frames: Optional[np.ndarray] = None  # uint8[T + 1, S, S, 3] when recorded


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sensible at 0 and n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _stack(observations: list[dict]) -> dict:
    return {k: np.stack([o[k] for o in observations]) for k in observations[0]}


def rollout(policy: Policy, episodes_per_task: int, tasks: Sequence[str] = TASKS, seed: int = 0,
            world: WorldConfig = WorldConfig(), record: int = 0, progress: bool = False,
            execute: Optional[int] = None) -> list[Episode]:
    """Run ``episodes_per_task`` episodes of each task; the first ``record`` of each task keep frames
    (third-person). ``execute``: steps of each predicted chunk to run before re-planning (None = all)."""
    if execute is not None and execute < 1:
        raise ValueError(f"execute must be >= 1 step of each chunk, got {execute}")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {TASKS}")
    envs, recorded, seeds = [], [], []
    for t in tasks:
        for i in range(episodes_per_task):
            seeds.append(EVAL_SEED_OFFSET + seed * 100_000 + i)
            envs.append(Tabletop(seeds[-1], t, world))
            recorded.append(i < record)
    observations = [e.observe() for e in envs]
    frames = [[o["image"]] if r else None for o, r in zip(observations, recorded)]
    done = [False] * len(envs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=world.max_steps, desc="rollout", unit="step", leave=False)
    plan, planned_at = None, 0
    steps = 0
    while not all(done):
        if plan is None or steps - planned_at >= min(execute or plan.shape[1], plan.shape[1]):
            plan = np.asarray(policy(_stack(observations), [e.instruction for e in envs], envs), np.float64)
            if plan.ndim == 2:
                plan = plan[:, None]
            if plan.ndim != 3 or plan.shape[0] != len(envs):
                raise ValueError(f"policy returned actions of shape {plan.shape}; expected [{len(envs)}, 7] or "
                                 f"[{len(envs)}, K, 7]")
            planned_at = steps
        actions = plan[:, steps - planned_at]
        for i, env in enumerate(envs):
            if done[i]:
                continue
            _, done[i], _ = env.step(actions[i])
            observations[i] = env.observe()
            if frames[i] is not None:
                frames[i].append(observations[i]["image"])
        steps += 1
        if bar:
            bar.update()
    if bar:
        bar.close()
    return [Episode(e.task, s, e.instruction, e.success, e.steps, np.stack(f) if f is not None else None)
            for e, s, f in zip(envs, seeds, frames)]


def summarize(episodes: list[Episode]) -> dict:
    """{task: {episodes, successes, success_rate, ci95: [lo, hi]}, "all": {...}}."""
    out = {}
    groups = {t: [e for e in episodes if e.task == t] for t in dict.fromkeys(e.task for e in episodes)}
    groups["all"] = episodes
    for name, group in groups.items():
        k, n = sum(e.success for e in group), len(group)
        lo, hi = wilson_interval(k, n)
        out[name] = {"episodes": n, "successes": k, "success_rate": k / max(n, 1), "ci95": [lo, hi],
                     "mean_steps": float(np.mean([e.steps for e in group])) if group else 0.0}
    return out


def random_policy(seed: int = 0, world: WorldConfig = WorldConfig()) -> Policy:
    """Uniform motion within the per-step limit, gripper open or closed with equal odds."""
    rng = np.random.default_rng(seed)

    def act(observations, instructions, envs):
        n = len(instructions)
        a = np.zeros((n, 7))
        a[:, :2] = rng.uniform(-world.max_move, world.max_move, (n, 2))
        a[:, 6] = rng.integers(0, 2, n)
        return a

    return act


def expert_policy(observations, instructions, envs) -> np.ndarray:
    return np.stack([e.expert_action() for e in envs])


def vla_policy(policy, unnorm_key=None) -> Policy:
    """A :class:`ovla_jax.policy.OpenVLAPolicy` as an evaluation policy (observations and words only):
    it gets the wrist image and the state when the model reads them."""
    cfg = policy.config

    def act(observations, instructions, envs):
        wrist = observations["wrist_image"] if cfg.num_images > 1 else None
        state = observations["state"] if cfg.proprio_dim else None
        return policy.predict_action(observations["image"], instructions, unnorm_key, wrist_images=wrist,
                                     proprio=state)

    return act


def format_table(results: dict) -> str:
    """Rows: policy x task success rates with their 95% intervals."""
    tasks = list(next(iter(results.values())))
    lines = [f"{'policy':<8}" + "".join(f"{t:>26}" for t in tasks)]
    for policy, summary in results.items():
        cells = [f"{s['success_rate']:6.1%} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] n={s['episodes']:<3}"
                 for s in (summary[t] for t in tasks)]
        lines.append(f"{policy:<8}" + "".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)
