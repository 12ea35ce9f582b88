"""Dynamic batching: requests that queue while the model runs (and, with ``max_wait_ms`` > 0, those
arriving within that long of the first) run as one jitted call.

Batch sizes are rounded up to a bucket (1, 2, 4, ... ``max_batch``; padded with copies of the last
example, whose answers are dropped), and :meth:`Batcher.warm_up` compiles every bucket before the server
accepts traffic, so nothing compiles while serving. Examples that cannot share a call (other statistics
or image sizes) run as separate calls of the same collection. The model runs on one worker thread: it
already uses every core, and the event loop stays free to accept and validate requests meanwhile.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Optional

import numpy as np

from ovla_jax.serve.requests import Example


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch (max_batch itself included even when not a power of two)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def run_examples(policy, examples: list[Example], bucket_sizes: list[int]) -> list[np.ndarray]:
    """One policy call for examples of one group, padded up to a bucket -> one action array each."""
    n = len(examples)
    size = next(b for b in bucket_sizes if b >= n)
    padded = examples + [examples[-1]] * (size - n)
    first = padded[0]
    images = np.stack([e.image for e in padded])
    wrist = None if first.wrist_image is None else np.stack([e.wrist_image for e in padded])
    proprio = None if first.proprio is None else np.stack([e.proprio for e in padded])
    actions = policy.predict_action(images, [e.instruction for e in padded], first.unnorm_key,
                                    wrist_images=wrist, proprio=proprio)
    return [np.asarray(a, np.float32) for a in actions[:n]]


class Batcher:
    def __init__(self, policy, max_batch: int = 8, max_wait_ms: float = 0.0):
        self.policy = policy
        self.sizes = buckets(max_batch)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue: Optional[asyncio.Queue] = None
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovla-serve-model")
        self.calls = 0  # batched model calls so far (metrics)
        self.served = 0

    def warm_up(self, example: Example, progress=print) -> None:
        """Compile every bucket size now (the server listens only afterwards)."""
        for size in self.sizes:
            t = time.perf_counter()
            run_examples(self.policy, [example] * size, self.sizes)
            if progress:
                progress(f"compiled batch {size} in {time.perf_counter() - t:.1f}s")

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        self._task.cancel()
        self.worker.shutdown(wait=False)

    async def submit(self, example: Example) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((example, future))
        return await future

    async def _collect(self) -> list:
        items = [await self.queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(items) < self.max_batch:
            timeout = deadline - time.perf_counter()
            if timeout <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), timeout))
            except asyncio.TimeoutError:
                break
        while len(items) < self.max_batch and not self.queue.empty():  # whatever queued during the last call
            items.append(self.queue.get_nowait())
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            groups: dict = {}
            for example, future in items:
                groups.setdefault(example.group(), []).append((example, future))
            for members in groups.values():
                examples = [e for e, _ in members]
                try:
                    actions = await loop.run_in_executor(self.worker, run_examples, self.policy, examples, self.sizes)
                except Exception as e:  # a server-side failure: every caller of this call hears of it
                    for _, future in members:
                        if not future.done():
                            future.set_exception(e)
                    continue
                self.calls += 1
                self.served += len(members)
                for (_, future), action in zip(members, actions):
                    if not future.done():
                        future.set_result(action)
