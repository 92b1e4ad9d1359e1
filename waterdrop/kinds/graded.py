"""Graded quality scores (``GradedHead``): ordered grades such as a sharpness score 1-5.

Scores are the head's cumulative probabilities P(grade > k) for the K-1 boundaries; the
expected grade is their sum. Reported: mean absolute error in grades, exact accuracy of
the rounded expected grade, Spearman rank correlation, the AP of every boundary, and the
confusion of grades. No threshold is chosen: the grade is the decision.
"""

from __future__ import annotations

import numpy as np

from waterdrop.evaluation.metrics import average_precision, average_ranks
from waterdrop.kinds.base import TaskKind, register_kind


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def boundary_aps(scores: np.ndarray, truth: np.ndarray) -> list[float]:
    return [average_precision(scores[:, k], (truth > k).astype(np.int64)) for k in range(scores.shape[1])]


@register_kind
class GradedKind(TaskKind):
    name = "graded"
    threshold_key = None
    uses_target = False
    result_fields = {"grade": "string", "score": "float32", "above": "scores"}

    def validation_metrics(self, scores, truth):
        aps = boundary_aps(scores, truth)
        mean_ap = float(np.nanmean(aps)) if not np.isnan(aps).all() else float("nan")
        return {"boundary_ap": mean_ap, "mae": float(np.abs(scores.sum(1) - truth).mean())}, mean_ap

    def report(self, task, scores, truth, thresholds=None):
        expected = scores.sum(axis=1)
        grades = np.clip(np.rint(expected), 0, len(task.labels) - 1).astype(np.int64)
        confusion = np.zeros((len(task.labels),) * 2, dtype=np.int64)
        np.add.at(confusion, (truth, grades), 1)
        aps = boundary_aps(scores, truth)
        return {"count": int(len(truth)), "mae": float(np.abs(expected - truth).mean()),
                "accuracy": float((grades == truth).mean()), "spearman": spearman(expected, truth),
                "boundary_ap": {f"above {label}": ap for label, ap in zip(task.labels, aps)},
                "confusion": {"rows: true grade, columns: predicted": confusion.tolist()}, "labels": task.labels}

    def thresholds(self, report):
        return None

    def summary(self, report):
        return {"count": report["count"], "MAE": report["mae"]}

    def format(self, task_name, report):
        aps = "  ".join(f"{k} {v:.2f}" for k, v in report["boundary_ap"].items())
        return [f"{task_name}: MAE {report['mae']:.3f} grades  accuracy {report['accuracy']:.3f}  "
                f"Spearman {report['spearman']:.3f}", f"  boundary AP {aps}"]

    def decide(self, entry, outputs):
        expected = outputs["prob"].sum(axis=1)
        return np.clip(np.rint(expected), 0, len(entry["labels"]) - 1).astype(np.int64)[:, None]

    def runtime_result(self, entry, outputs, row, size):
        above = outputs["prob"][row]
        expected = float(above.sum())
        labels = entry["labels"]
        return {"grade": labels[int(np.clip(round(expected), 0, len(labels) - 1))], "score": round(expected, 4),
                "above": {label: round(float(p), 6) for label, p in zip(labels, above)}}
