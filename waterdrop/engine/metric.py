"""Validation metric for mmengine's loop: each task's kind says what it measures."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from mmengine.evaluator import BaseMetric

from waterdrop.kinds import kind_of


def primary_scores(results: list[dict], kinds: dict[str, str]) -> dict[str, float]:
    """Each kind's validation metrics as ``<task>/<metric>`` and ``score``, the mean of the
    tasks' primary metrics (AP, mAP, boundary AP), which picks the best checkpoint (train.checkpoint: best)."""
    grouped = defaultdict(list)
    for sample in results:
        grouped[sample["task"]].append(sample)
    metrics, primaries = {}, []
    for task, samples in grouped.items():
        scores = np.stack([s["score"] for s in samples])
        truth = np.stack([s["truth"] for s in samples])
        values, primary = kind_of(kinds[task]).validation_metrics(scores, truth)
        metrics.update({f"{task}/{name}": value for name, value in values.items()})
        primaries.append(primary)
    metrics["score"] = float(np.nanmean(primaries)) if primaries else float("nan")
    return metrics


class TaskMetric(BaseMetric):
    default_prefix = "val"

    def __init__(self, kinds: dict[str, str]):
        super().__init__()
        self.kinds = kinds

    def process(self, data_batch, data_samples) -> None:
        self.results.extend(data_samples)

    def compute_metrics(self, results: list) -> dict:
        return primary_scores(results, self.kinds)
