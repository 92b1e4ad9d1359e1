"""Evaluate a MultiTaskNet on every task's validation set and write the report."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from waterdrop.config import RegistryConfig
from waterdrop.data.loaders import eval_loader
from waterdrop.detection import detect, detection_ap
from waterdrop.evaluation import plots
from waterdrop.evaluation.metrics import average_precision, binary_report, multilabel_report
from waterdrop.model.multitask import MultiTaskNet


@torch.no_grad()
def predict_split(net: MultiTaskNet, cfg: RegistryConfig, split: str = "val",
                  device: str = "cpu") -> tuple[dict, dict, dict]:
    """Scores and truth per task over its ``split`` ("val" or "test"), the skipped
    (undecodable) paths, and for heads that detect boxes their full predictions and targets."""
    net.eval().to(device)
    scores, truth, skipped = defaultdict(list), defaultdict(list), defaultdict(set)
    raw = defaultdict(lambda: defaultdict(list))
    for batch in eval_loader(cfg, net, split):
        for task, path in batch["skipped"]:
            skipped[task].add(path)
        if not len(batch["inputs"]):
            continue
        outputs = net.forward_tasks(batch["inputs"].to(device), batch["task_index"].to(device))
        for name, (s, t) in net.scores_and_truth(outputs, batch["targets"]).items():
            scores[name].append(s)
            truth[name].append(t)
            if net.heads[name].uses_boxes:
                for key, value in net.task_predictions(name, outputs[name]).items():
                    raw[name][key].append(value.float().cpu().numpy())
                raw[name]["target"].append(batch["targets"][name].numpy())
    data = {name: (np.concatenate(scores[name]), np.concatenate(truth[name])) for name in scores}
    details = {name: {k: np.concatenate(v) for k, v in values.items()} for name, values in raw.items()}
    return data, {task: sorted(paths) for task, paths in skipped.items()}, details


def detector_report(head, details: dict, truth: np.ndarray) -> dict:
    """Detector mAP@0.5 per class, and the AP of the detector classes' tags with and without
    the detector's assist."""
    spec, labels = head.detector, head.labels
    boxes = details["target"][:, len(labels):].reshape(len(truth), -1, 5)
    truths = [[(int(row[0]), row[1:]) for row in image if row[0] >= 0] for image in boxes]
    # mAP is scored over all candidate boxes (a low threshold), as is usual for AP. Greedy NMS
    # never lets a lower score suppress a higher one, so the reported detections are these
    # candidates at or above the score threshold.
    ranked = [detect(b, s, 0.01, spec["nms_iou"]) for b, s in zip(details["det_boxes"], details["det_scores"])]
    found = [[d for d in image if d[1] >= spec["score_threshold"]] for image in ranked]
    aps = detection_ap(ranked, truths, len(spec["classes"]))
    tags = {}
    for c, label in enumerate(spec["classes"]):
        j = labels.index(label)
        known = truth[:, j] >= 0
        tags[label] = {"ap_with_detector": average_precision(details["prob"][known, j], truth[known, j]),
                       "ap_tag_only": average_precision(details["tag_prob"][known, j], truth[known, j]),
                       "detector_ap50": aps[c]}
    valid = [a for a in aps if not np.isnan(a)]
    return {"map50": float(np.mean(valid)) if valid else float("nan"), "fusion": spec["fusion"],
            "detections_per_image": float(np.mean([len(f) for f in found])), "classes": tags}


def _clean(value):
    """NaN -> None so the JSON stays standard."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def evaluate(net: MultiTaskNet, cfg: RegistryConfig, out_dir: str | Path, device: str = "cpu") -> dict:
    """Write ``metrics.json``, ``thresholds.json`` and PNG plots under ``out_dir``; return the metrics.

    Thresholds are always chosen on ``val``. A task with a ``test`` split is reported on it,
    at those thresholds; a task without one is reported on ``val`` and marked in-sample
    (``val`` also picked the checkpoint and the thresholds, which flatters the figures).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    val, skipped, details = predict_split(net, cfg, "val", device)
    has_test = any(task.test is not None for task in cfg.tasks)
    test, test_skipped, test_details = predict_split(net, cfg, "test", device) if has_test else ({}, {}, {})
    report = {}
    for task in cfg.tasks:
        if task.name not in val:
            raise ValueError(f"task {task.name}: no validation image could be decoded")
        chosen = task_report(net.heads[task.name], task, *val[task.name])
        result, split = chosen, "val"
        if task.test is not None:
            if task.name not in test:
                raise ValueError(f"task {task.name}: no test image could be decoded")
            result = task_report(net.heads[task.name], task, *test[task.name], chosen_thresholds(chosen))
            split = "test"
            result["val_summary"] = _summary(chosen)
        data, split_details = (test, test_details) if split == "test" else (val, details)
        scores, truth = data[task.name]
        _plot(out_dir, task, result, scores, truth)
        if task.name in split_details:
            result["detector"] = detector_report(net.heads[task.name], split_details[task.name], truth)
        result["split"] = split
        result["in_sample"] = split == "val"
        result["skipped_images"] = sorted(set(skipped.get(task.name, [])) | set(test_skipped.get(task.name, [])))
        report[task.name] = result
    (out_dir / "metrics.json").write_text(json.dumps(_clean(report), indent=2))
    (out_dir / "thresholds.json").write_text(json.dumps(thresholds_of(report), indent=2))
    return report


def task_report(head, task, scores: np.ndarray, truth: np.ndarray, thresholds=None) -> dict:
    """One task's metrics; thresholds are chosen for the task's target unless given."""
    deploy = task.deploy
    if head.kind == "binary":
        return binary_report(scores, truth, deploy.prevalence, deploy.target_metric, deploy.target_value, thresholds)
    return multilabel_report(scores, truth, task.labels, deploy.target_metric, deploy.target_value,
                             deploy.label_targets, task.relations, thresholds)


def _summary(report: dict) -> dict:
    """The headline figures of a report, kept next to the test report for comparison."""
    return {"count": report["count"], "ap" if "ap" in report else "map": report.get("ap", report.get("map"))}


def _plot(out_dir: Path, task, result: dict, scores: np.ndarray, truth: np.ndarray) -> None:
    if "threshold" in result:
        plots.binary_pr(out_dir / f"{task.name}_pr.png", task.name, scores, truth, task.deploy.prevalence,
                        result["threshold"])
        plots.confusion(out_dir / f"{task.name}_confusion.png", task.name, result["at_threshold"],
                        result["threshold"])
    else:
        plots.multilabel_pr_grid(out_dir / f"{task.name}_pr.png", task.name, scores, truth, task.labels,
                                 result["thresholds"])


def chosen_thresholds(task_result: dict) -> float | dict[str, float]:
    """A task's binary threshold, or its per-label thresholds."""
    return task_result["threshold"] if "threshold" in task_result else task_result["thresholds"]


def thresholds_of(report: dict) -> dict:
    """Per task: the binary threshold, or the per-label thresholds."""
    return {task: chosen_thresholds(r) for task, r in report.items()}


def format_report(report: dict) -> str:
    """A short human-readable summary, one block per task."""
    lines = []
    for task, r in report.items():
        if r.get("split") == "test":
            val = r["val_summary"]
            lines.append(f"{task}: on its test split ({r['count']} images; validation picked the checkpoint and "
                         f"the thresholds, {'AP' if 'ap' in val else 'mAP'} there "
                         f"{val.get('ap', val.get('map')):.3f})")
        elif r.get("in_sample"):
            lines.append(f"{task}: IN-SAMPLE on its validation split (it also picked the checkpoint and the "
                         "thresholds; add data.test to the task YAML for an honest figure)")
        if "ap" in r:
            at, dep = r["at_threshold"], r["deploy"]
            lines.append(f"{task}: AP {r['ap']:.3f}  ROC-AUC {r['roc_auc']:.3f}  threshold {r['threshold']:.3f} "
                         f"(target {r['target']})")
            lines.append(f"  {r.get('split', 'val')} mix ({r['positives']}/{r['count']} positive): "
                         f"P {at['precision']:.3f}  "
                         f"R {at['recall']:.3f}  F1 {at['f1']:.3f}")
            if dep["prevalence"]:
                lines.append(f"  at deploy prevalence {dep['prevalence']:g}: P {dep['precision']:.3f}  "
                             f"R {dep['recall']:.3f}  AP {dep['ap']:.3f}")
        else:
            micro = r["micro"]
            lines.append(f"{task}: mAP {r['map']:.3f}  micro P {micro['precision']:.3f}  R {micro['recall']:.3f}  "
                         f"F1 {micro['f1']:.3f} at per-label thresholds (target {r['target']})")
            if "micro_after_relations" in r:
                after = r["micro_after_relations"]
                lines.append(f"  after the relation graph: micro P {after['precision']:.3f}  R {after['recall']:.3f}  "
                             f"F1 {after['f1']:.3f}")
            lines.append("  AP " + "  ".join(f"{k} {v['ap']:.2f}" for k, v in r["labels"].items()))
            if "detector" in r:
                det = r["detector"]
                lines.append(f"  detector mAP@0.5 {det['map50']:.3f}; tag AP with / without the detector "
                             f"(fusion {det['fusion']}): " + "  ".join(
                                 f"{k} {v['ap_with_detector']:.2f} / {v['ap_tag_only']:.2f}"
                                 for k, v in det["classes"].items()))
            if r["fallback_labels"]:
                lines.append(f"  default threshold (too few positives): {', '.join(r['fallback_labels'])}")
        if r["skipped_images"]:
            lines.append(f"  skipped {len(r['skipped_images'])} undecodable validation images")
    return "\n".join(lines)
