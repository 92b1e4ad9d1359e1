"""Binary and multi-label metrics in numpy, including metrics at the deploy prevalence.

A validation set is usually far richer in positives than the online pool. Re-weighting
every negative by ``w = (1 - pi) / pi * P / N`` (pi the deploy prevalence, P and N the
validation positives and negatives) gives the precision a threshold will have online:
at 1:200 a 1:1 validation precision of 0.94 at recall 0.98 is worth about 0.07.
"""

from __future__ import annotations

import math

import numpy as np

from waterdrop.relations import RelationGraph

MIN_POSITIVES_FOR_THRESHOLD = 5
DEFAULT_THRESHOLD = 0.5


def negative_weight(truth: np.ndarray, prevalence: float | None) -> float:
    """Weight of one negative so that the set has the given positive prevalence."""
    positives, negatives = int((truth == 1).sum()), int((truth == 0).sum())
    if prevalence is None or positives == 0 or negatives == 0:
        return 1.0
    return (1 - prevalence) / prevalence * positives / negatives


def pr_curve(scores: np.ndarray, truth: np.ndarray, neg_weight: float = 1.0):
    """Precision, recall and threshold at every distinct score, highest threshold first.

    Predicting positive means ``score >= threshold``.
    """
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order]
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    true_pos = np.cumsum(truth == 1)[last_of_tie].astype(float)
    false_pos = np.cumsum(truth == 0)[last_of_tie] * neg_weight
    precision = true_pos / np.maximum(true_pos + false_pos, 1e-12)
    recall = true_pos / max(int((truth == 1).sum()), 1)
    return precision, recall, scores[last_of_tie]


def average_precision(scores: np.ndarray, truth: np.ndarray, neg_weight: float = 1.0) -> float:
    """Area under the step PR curve (sum of precision times recall increments)."""
    if not (truth == 1).any():
        return float("nan")
    precision, recall, _ = pr_curve(scores, truth, neg_weight)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share their average rank."""
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    positives, negatives = int((truth == 1).sum()), int((truth == 0).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[truth == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def choose_threshold(scores: np.ndarray, truth: np.ndarray, metric: str, value: float,
                     neg_weight: float = 1.0) -> tuple[float, bool]:
    """Threshold meeting a target: the highest one with recall >= value, or the lowest one
    with precision >= value (precision computed with ``neg_weight``). Returns (threshold,
    target met); when no threshold meets the target, the closest one is returned."""
    precision, recall, thresholds = pr_curve(scores, truth, neg_weight)
    if metric == "recall":
        meets = np.nonzero(recall >= value)[0]
        return (float(thresholds[meets[0]]), True) if len(meets) else (float(thresholds[-1]), False)
    meets = np.nonzero(precision >= value)[0]
    if len(meets):
        return float(thresholds[meets[-1]]), True
    return float(thresholds[int(np.argmax(precision))]), False


def at_threshold(scores: np.ndarray, truth: np.ndarray, threshold: float, neg_weight: float = 1.0) -> dict:
    """Confusion counts, precision, recall and F1 at one threshold."""
    predicted = scores >= threshold
    tp, fp = int((predicted & (truth == 1)).sum()), int((predicted & (truth == 0)).sum())
    fn, tn = int((~predicted & (truth == 1)).sum()), int((~predicted & (truth == 0)).sum())
    weighted_fp = fp * neg_weight
    precision = tp / (tp + weighted_fp) if tp + weighted_fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def binary_report(scores: np.ndarray, truth: np.ndarray, prevalence: float | None, target_metric: str,
                  target_value: float, threshold: float | None = None) -> dict:
    """Everything eval reports for one binary task.

    The threshold is chosen for the target unless given (chosen on other data); a precision
    target is judged at the deploy prevalence, since that is the precision users will see.
    ``target.met`` says whether the target holds on these scores.
    """
    weight = negative_weight(truth, prevalence)
    if threshold is None:
        threshold, _ = choose_threshold(scores, truth, target_metric, target_value,
                                        weight if target_metric == "precision" else 1.0)
    val_mix = at_threshold(scores, truth, threshold)
    deploy = at_threshold(scores, truth, threshold, weight)
    met = (deploy if target_metric == "precision" else val_mix)[target_metric] >= target_value
    return {
        "count": int(len(truth)),
        "positives": int((truth == 1).sum()),
        "ap": average_precision(scores, truth),
        "roc_auc": roc_auc(scores, truth),
        "threshold": threshold,
        "target": {target_metric: target_value, "met": met},
        "at_threshold": val_mix,
        "deploy": {
            "prevalence": prevalence,
            "ap": average_precision(scores, truth, weight),
            "precision": deploy["precision"],
            "recall": deploy["recall"],
            "f1": deploy["f1"],
        },
    }


def multilabel_report(scores: np.ndarray, truth: np.ndarray, labels: list[str], target_metric: str,
                      target_value: float, label_targets: dict[str, tuple[str, float]] | None = None,
                      graph: RelationGraph | None = None, thresholds: dict[str, float] | None = None) -> dict:
    """Per-label AP, AUC and threshold for the target; mAP over labels with positives.

    Entries of ``truth`` equal to -1 (label not annotated) are left out per label. A label
    in ``label_targets`` uses its own (metric, value). Labels with fewer than
    MIN_POSITIVES_FOR_THRESHOLD validation positives keep the default threshold and are
    listed under ``fallback_labels``. Given ``thresholds`` (chosen on other data) are used
    as they are. With a relation ``graph``, ``micro_after_relations`` scores the decisions
    after it, next to ``micro`` (before).
    """
    per_label, chosen, fallback = {}, {}, []
    label_targets = label_targets or {}
    for j, label in enumerate(labels):
        known = truth[:, j] >= 0
        s, t = scores[known, j], truth[known, j]
        metric, value = label_targets.get(label, (target_metric, target_value))
        if thresholds is not None:
            threshold = thresholds[label]
        elif int((t == 1).sum()) >= MIN_POSITIVES_FOR_THRESHOLD:
            threshold, _ = choose_threshold(s, t, metric, value)
        else:
            threshold = DEFAULT_THRESHOLD
            fallback.append(label)
        met = bool((t == 1).any()) and at_threshold(s, t, threshold)[metric] >= value
        chosen[label] = threshold
        per_label[label] = {"positives": int((t == 1).sum()), "ap": average_precision(s, t), "roc_auc": roc_auc(s, t),
                            "threshold": threshold, "target": {metric: value}, "target_met": met,
                            **at_threshold(s, t, threshold)}
    aps = [v["ap"] for v in per_label.values() if not np.isnan(v["ap"])]
    predicted = scores >= np.array([chosen[label] for label in labels])
    report = {
        "count": int(len(truth)),
        "map": float(np.mean(aps)) if aps else float("nan"),
        "micro": micro_scores(predicted, truth),
        "target": {target_metric: target_value},
        "thresholds": chosen,
        "fallback_labels": fallback,
        "labels": per_label,
    }
    if graph:
        report["micro_after_relations"] = micro_scores(graph.apply(scores, predicted), truth)
    return report


def micro_scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """Micro precision, recall and F1 of (N, L) decisions; unknown truth (-1) is left out."""
    tp = int((predicted & (truth == 1)).sum())
    fp, fn = int((predicted & (truth == 0)).sum()), int((~predicted & (truth == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


def json_safe(value):
    """NaN (a metric without positives, say) -> None, so the JSON stays standard."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
