"""Validation metric for mmengine's loop: AP per binary task, mAP per multi-label task."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from mmengine.evaluator import BaseMetric

from waterdrop.evaluation.metrics import average_precision, roc_auc


def primary_scores(results: list[dict], kinds: dict[str, str]) -> dict[str, float]:
    """``<task>/ap`` (binary), ``<task>/map`` (multi-label), ``<task>/roc_auc`` and ``score``,
    the mean of the per-task AP / mAP that picks the best checkpoint."""
    grouped = defaultdict(list)
    for sample in results:
        grouped[sample["task"]].append(sample)
    metrics, primaries = {}, []
    for task, samples in grouped.items():
        scores = np.stack([s["score"] for s in samples])
        truth = np.stack([s["truth"] for s in samples])
        if kinds[task] == "binary":
            primary = average_precision(scores, truth)
            metrics[f"{task}/ap"] = primary
            metrics[f"{task}/roc_auc"] = roc_auc(scores, truth)
        else:
            aps = [average_precision(scores[truth[:, j] >= 0, j], truth[truth[:, j] >= 0, j])
                   for j in range(truth.shape[1])]
            primary = float(np.nanmean(aps)) if not np.isnan(aps).all() else float("nan")
            metrics[f"{task}/map"] = primary
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
