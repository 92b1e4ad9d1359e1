"""Batch sampling: every batch mixes tasks by the configured policy, and each task fills its
slots from its own stream (plain, balanced, and unlabeled images for mean teacher)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np


def task_sampling_probabilities(policy: str, sizes: list[int], names: list[str],
                                weights: dict[str, float]) -> np.ndarray:
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


def stochastic_round(value: float, rng: np.random.Generator) -> int:
    """floor(value), plus one with probability equal to the fractional part."""
    whole = math.floor(value)
    return whole + int(rng.random() < value - whole)


class PlainStream:
    """Reshuffled passes over a set of indices; a pass ends, the next one starts."""

    def __init__(self, indices, rng: np.random.Generator):
        self.indices, self.rng = np.asarray(indices, dtype=np.int64), rng
        self.queue: list[int] = []

    def take(self, count: int) -> list[int]:
        taken = []
        for _ in range(count):
            if not self.queue:
                self.queue = self.rng.permutation(self.indices).tolist()
            taken.append(self.queue.pop())
        return taken


class BalancedStream:
    """A fixed fraction of normal images (class 0), the rest spread evenly over the
    sub-classes (1..K) present; a rare sub-class repeats, reshuffled on every pass.

    ``normal_fraction`` of the task's slots in a batch are normal (stochastically rounded,
    so fractions such as 2/3 hold on average); sub-classes take turns in a shuffled cycle.
    """

    def __init__(self, classes: np.ndarray, normal_fraction: float, rng: np.random.Generator):
        self.rng = rng
        self.pools = {int(c): PlainStream(np.nonzero(classes == c)[0], rng) for c in np.unique(classes)}
        self.subclasses = sorted(c for c in self.pools if c != 0)
        self.normal_fraction = normal_fraction if 0 in self.pools and self.subclasses else float(0 in self.pools)
        self.turns: list[int] = []

    def take(self, count: int) -> list[int]:
        normals = min(count, stochastic_round(count * self.normal_fraction, self.rng))
        taken = self.pools[0].take(normals) if normals else []
        for _ in range(count - normals):
            if not self.turns:
                self.turns = self.rng.permutation(self.subclasses).tolist()
            taken += self.pools[self.turns.pop()].take(1)
        return taken


def repeat_factors(label_sets: list[list[int]], num_labels: int, threshold: float, function: str) -> np.ndarray:
    """Repeat-factor sampling (Gupta et al., LVIS 2019): label repeat factor
    ``r(c) = max(1, F(t / f(c)))`` with ``f(c)`` the fraction of images carrying label c and
    F the square root (``sqrt``) or identity (``uniform``); an image's factor is the max
    over its labels (1 for an image without labels)."""
    counts = np.zeros(num_labels)
    for labels in label_sets:
        counts[list(set(labels))] += 1
    frequency = counts / max(len(label_sets), 1)
    ratio = threshold / np.maximum(frequency, 1e-12)
    per_label = np.maximum(1.0, np.sqrt(ratio) if function == "sqrt" else ratio)
    return np.array([max([1.0, *(per_label[c] for c in labels)]) for labels in label_sets])


class RepeatFactorStream:
    """Each pass repeats image i ``floor(r_i)`` times plus once more with probability
    ``r_i - floor(r_i)`` (stochastic rounding, drawn anew every pass), then shuffles."""

    def __init__(self, factors: np.ndarray, rng: np.random.Generator):
        self.factors, self.rng = np.asarray(factors, dtype=float), rng
        self.queue: list[int] = []

    def take(self, count: int) -> list[int]:
        taken = []
        for _ in range(count):
            if not self.queue:
                copies = np.floor(self.factors) + (self.rng.random(len(self.factors)) < self.factors % 1)
                self.queue = self.rng.permutation(np.repeat(np.arange(len(self.factors)), copies.astype(int))).tolist()
            taken.append(self.queue.pop())
        return taken


class WithUnlabeled:
    """A labeled stream plus a pool of unlabeled images taking ``fraction`` of the slots."""

    def __init__(self, labeled, unlabeled_indices, fraction: float, rng: np.random.Generator):
        self.labeled, self.unlabeled = labeled, PlainStream(unlabeled_indices, rng)
        self.fraction, self.rng = fraction, rng

    def take(self, count: int) -> list[int]:
        unlabeled = min(count, stochastic_round(count * self.fraction, self.rng))
        return self.labeled.take(count - unlabeled) + self.unlabeled.take(unlabeled)


StreamFactory = Callable[[np.random.Generator], object]


class MultiTaskBatchSampler:
    """Yields batches of global indices into a MultiTaskDataset.

    Each slot of a batch draws its task from ``weights``; each task then fills its slots
    from its stream (built anew each epoch by ``streams[task](rng)``, returning local
    indices). One epoch is as many samples as all training sets hold labeled images
    (``labeled_sizes``, default ``sizes``): unlabeled images ride along, they do not lengthen
    it. Under DDP every rank draws the same global sequence and keeps every
    ``world_size``-th batch.
    """

    def __init__(self, sizes: list[int], batch_size: int, weights: np.ndarray, seed: int,
                 streams: list[StreamFactory] | None = None, rank: int = 0, world_size: int = 1,
                 labeled_sizes: list[int] | None = None):
        self.sizes, self.offsets = sizes, np.cumsum([0] + list(sizes))[:-1]
        self.labeled_sizes = list(labeled_sizes if labeled_sizes is not None else sizes)
        self.batch_size, self.weights, self.seed = batch_size, weights, seed
        self.streams = streams or [lambda rng, n=n: PlainStream(np.arange(n), rng) for n in sizes]
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    @property
    def sampler(self) -> MultiTaskBatchSampler:
        """mmengine's DistSamplerSeedHook calls ``batch_sampler.sampler.set_epoch``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, math.ceil(sum(self.labeled_sizes) / (self.batch_size * self.world_size)))

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        streams = [make(rng) for make in self.streams]
        for batch_number in range(len(self) * self.world_size):
            counts = np.bincount(rng.choice(len(self.sizes), size=self.batch_size, p=self.weights),
                                 minlength=len(self.sizes))
            batch = [int(self.offsets[t] + i) for t, count in enumerate(counts) if count
                     for i in streams[t].take(int(count))]
            if batch_number % self.world_size == self.rank:
                yield batch
