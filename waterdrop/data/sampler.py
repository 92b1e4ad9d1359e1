"""The multi-task batch sampler: every batch mixes tasks by the configured policy."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np


def task_weights(policy: str, sizes: list[int], names: list[str], weights: dict[str, float]) -> np.ndarray:
    """Probability that a batch slot goes to each task.

    ``size``: proportional to the task's training set; ``uniform``: equal;
    ``weights``: the registry's ``train.task_sampling.weights`` (absent tasks get 0).
    """
    if policy == "size":
        raw = np.asarray(sizes, dtype=float)
    elif policy == "uniform":
        raw = np.ones(len(sizes))
    else:
        raw = np.asarray([weights.get(n, 0.0) for n in names], dtype=float)
    return raw / raw.sum()


class MultiTaskBatchSampler:
    """Yields batches of global indices into a MultiTaskDataset.

    Each slot of a batch draws its task from ``weights``; each task walks through its own
    stream of reshuffled passes, so small tasks repeat rather than run dry. One epoch is
    as many samples as all training sets hold. Under DDP every rank draws the same global
    sequence and keeps every ``world_size``-th batch.
    """

    def __init__(self, sizes: list[int], batch_size: int, weights: np.ndarray, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.sizes, self.offsets = sizes, np.cumsum([0] + list(sizes))[:-1]
        self.batch_size, self.weights, self.seed = batch_size, weights, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    @property
    def sampler(self) -> MultiTaskBatchSampler:
        """mmengine's DistSamplerSeedHook calls ``batch_sampler.sampler.set_epoch``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, math.ceil(sum(self.sizes) / (self.batch_size * self.world_size)))

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        streams = [[] for _ in self.sizes]
        for batch_number in range(len(self) * self.world_size):
            tasks = rng.choice(len(self.sizes), size=self.batch_size, p=self.weights)
            batch = []
            for task in tasks:
                if not streams[task]:
                    streams[task] = rng.permutation(self.sizes[task]).tolist()
                batch.append(int(self.offsets[task] + streams[task].pop()))
            if batch_number % self.world_size == self.rank:
                yield batch
