"""Multi-label tags (``MultiLabelHead``): per-label thresholds, relation graph, small-object boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from waterdrop.detection import detect
from waterdrop.evaluation.metrics import average_precision, multilabel_report
from waterdrop.kinds.base import TaskKind, register_kind


@register_kind
class MultiLabelKind(TaskKind):
    name = "multilabel"
    threshold_key = "thresholds"
    uses_label_targets = True
    samplers = ("plain", "repeat_factor")
    result_fields = {"tags": "strings", "scores": "scores", "thresholds": "constant", "added_by_relations": "strings",
                     "removed_by_relations": "strings"}

    def validation_metrics(self, scores, truth):
        """mAP over labels with positives; unknown truth (-1) is left out per label."""
        aps = [average_precision(scores[truth[:, j] >= 0, j], truth[truth[:, j] >= 0, j])
               for j in range(truth.shape[1])]
        value = float(np.nanmean(aps)) if not np.isnan(aps).all() else float("nan")
        return {"map": value}, value

    def report(self, task, scores, truth, thresholds=None):
        deploy = task.deploy
        return multilabel_report(scores, truth, task.labels, deploy.target_metric, deploy.target_value,
                                 deploy.label_targets, task.relations, thresholds)

    def thresholds(self, report):
        return report["thresholds"]

    def summary(self, report):
        return {"count": report["count"], "mAP": report["map"]}

    def format(self, task_name, report):
        micro = report["micro"]
        lines = [f"{task_name}: mAP {report['map']:.3f}  micro P {micro['precision']:.3f}  R {micro['recall']:.3f}  "
                 f"F1 {micro['f1']:.3f} at per-label thresholds (target {report['target']})"]
        if "micro_after_relations" in report:
            after = report["micro_after_relations"]
            lines.append(f"  after the relation graph: micro P {after['precision']:.3f}  R {after['recall']:.3f}  "
                         f"F1 {after['f1']:.3f}")
        lines.append("  AP " + "  ".join(f"{k} {v['ap']:.2f}" for k, v in report["labels"].items()))
        if report["fallback_labels"]:
            lines.append(f"  default threshold (too few positives): {', '.join(report['fallback_labels'])}")
        return lines

    def plot(self, out_dir: Path, task, report, scores, truth):
        from waterdrop.evaluation import plots

        plots.multilabel_pr_grid(out_dir / f"{task.name}_pr.png", task.name, scores, truth, task.labels,
                                 report["thresholds"])

    def decide(self, entry, outputs):
        decided = super().decide(entry, outputs)
        graph = entry.get("relation_graph")  # the runtime's: the tags partner teams are served
        return graph.apply(outputs["prob"], decided) if graph else decided

    def runtime_result(self, entry, outputs, row, size):
        """Tags at the per-label thresholds, after the relation graph; with a detector also the
        ``objects`` after NMS, boxes in pixels of the original image."""
        labels, probs = entry["labels"], outputs["prob"][row]
        scores = {label: round(float(p), 6) for label, p in zip(labels, probs)}
        decided = probs >= np.array([entry["thresholds"][label] for label in labels])
        # The thresholds beside the scores, so a score reads as a decision without the metadata.
        result = {"tags": [label for label, d in zip(labels, decided) if d], "scores": scores,
                  "thresholds": {label: entry["thresholds"][label] for label in labels}}
        detector = entry.get("detector")
        if detector:
            found = detect(outputs["det_boxes"][row], outputs["det_scores"][row], detector["score_threshold"],
                           detector["nms_iou"])
            scale = np.array([*size, *size], dtype=float)
            result["objects"] = [{"label": detector["classes"][c], "score": round(score, 6),
                                  "box": [round(float(v), 1) for v in box * scale]} for c, score, box in found]
        graph = entry.get("relation_graph")
        if graph:
            after = graph.apply(probs[None], decided[None])[0]
            result["tags"] = [label for label, d in zip(labels, after) if d]
            result["added_by_relations"] = [label for label, d, a in zip(labels, decided, after) if a and not d]
            result["removed_by_relations"] = [label for label, d, a in zip(labels, decided, after) if d and not a]
        return result

    def cam_views(self, entry, result, cam, every_label):
        """One map per tag at or above its threshold (before the relation graph), or per tag."""
        scores, thresholds = result["scores"], entry["thresholds"]
        return [(label, cam[i]) for i, label in enumerate(entry["labels"])
                if every_label or scores[label] >= thresholds[label]]

    def label_probability(self, scores, truth):
        """Of the worst-fitting annotated tag; unannotated tags (-1) say nothing about the label."""
        fit = np.where(truth < 0, np.inf, np.where(truth == 1, scores, 1 - scores))
        worst = fit.min(axis=1)
        return np.where(np.isfinite(worst), worst, np.nan)

    def decisions(self, entry):
        return list(entry["labels"])

    def decision_truth(self, entry, names, missing):
        labels = entry["labels"]
        unknown = [name for name in [*names, *missing] if name not in labels]
        if unknown:
            raise ValueError(f"unknown label '{unknown[0]}'; known labels: {', '.join(labels)}")
        truth = np.array([int(label in names) for label in labels])
        truth[[labels.index(name) for name in missing]] = -1
        return truth
