"""Evaluate a MultiTaskNet: thresholds chosen on each task's val split, the report on its test split."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from waterdrop.config import RegistryConfig
from waterdrop.data.loaders import eval_loader
from waterdrop.detection import detect, detection_ap
from waterdrop.evaluation.metrics import average_precision, json_safe
from waterdrop.kinds import kind_of
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.progress import Progress


@torch.no_grad()
def predict_split(net: MultiTaskNet, cfg: RegistryConfig, split: str = "val",
                  device: str = "cpu") -> tuple[dict, dict, dict]:
    """Scores and truth per task over its ``split`` ("val" or "test"), the skipped
    (undecodable) paths, and for heads that detect boxes their full predictions and targets."""
    net.eval().to(device)
    scores, truth, skipped = defaultdict(list), defaultdict(list), defaultdict(set)
    raw = defaultdict(lambda: defaultdict(list))
    loader = eval_loader(cfg, net, split)
    meter = Progress(f"evaluate {split}", total=len(loader.dataset))
    for batch in loader:
        for task, path in batch["skipped"]:
            skipped[task].add(path)
        meter.update(len(batch["inputs"]) + len(batch["skipped"]), failed=len(batch["skipped"]))
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
    meter.close()
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


def evaluate(net: MultiTaskNet, cfg: RegistryConfig, out_dir: str | Path, device: str = "cpu",
             checkpoint: str | Path | None = None) -> dict:
    """Write ``metrics.json``, ``thresholds.json`` and PNG plots under ``out_dir``; return the metrics.
    With ``checkpoint``, ``evaluated.json`` records which file the thresholds were chosen for.

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
        kind = kind_of(net.heads[task.name].kind)
        chosen = kind.report(task, *val[task.name])
        result, split = chosen, "val"
        if task.test is not None:
            if task.name not in test:
                raise ValueError(f"task {task.name}: no test image could be decoded")
            result = kind.report(task, *test[task.name], kind.thresholds(chosen))
            split = "test"
            result["val_summary"] = kind.summary(chosen)
        data, split_details = (test, test_details) if split == "test" else (val, details)
        scores, truth = data[task.name]
        kind.plot(out_dir, task, result, scores, truth)
        if task.name in split_details:
            result["detector"] = detector_report(net.heads[task.name], split_details[task.name], truth)
        result["kind"] = kind.name
        result["split"] = split
        result["in_sample"] = split == "val"
        result["skipped_images"] = sorted(set(skipped.get(task.name, [])) | set(test_skipped.get(task.name, [])))
        report[task.name] = result
    (out_dir / "metrics.json").write_text(json.dumps(json_safe(report), indent=2))
    (out_dir / "thresholds.json").write_text(json.dumps(thresholds_of(report), indent=2))
    if checkpoint is not None:
        (out_dir / "evaluated.json").write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve())}))
    return report


def thresholds_of(report: dict) -> dict:
    """Per task, the decision thresholds its kind chose (a number, a dict per label, or None)."""
    return {task: kind_of(r["kind"]).thresholds(r) for task, r in report.items()}


def format_report(report: dict) -> str:
    """A short human-readable summary, one block per task."""
    lines = []
    for task, r in report.items():
        if r.get("split") == "test":
            val = ", ".join(f"{k} {v:.3f}" for k, v in r["val_summary"].items() if k != "count")
            lines.append(f"{task}: on its test split ({r['count']} images; validation picked the checkpoint and "
                         f"the thresholds, {val} there)")
        elif r.get("in_sample"):
            lines.append(f"{task}: IN-SAMPLE on its validation split (it also picked the checkpoint and the "
                         "thresholds; add data.test to the task YAML for an honest figure)")
        lines += kind_of(r["kind"]).format(task, r)
        if r["skipped_images"]:
            lines.append(f"  skipped {len(r['skipped_images'])} undecodable images")
    return "\n".join(lines)
