"""Evaluate a MultiTaskNet: thresholds chosen on each task's val split, the report on its test split."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from waterdrop.config import RegistryConfig
from waterdrop.data.dataset import task_entries
from waterdrop.data.loaders import eval_loader
from waterdrop.evaluation.metrics import json_safe
from waterdrop.features.base import registered_features
from waterdrop.kinds import kind_of
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.progress import Progress


@torch.no_grad()
def predict_split(net: MultiTaskNet, cfg: RegistryConfig, split: str = "val",
                  device: str = "cpu") -> tuple[dict, dict, dict]:
    """Scores and truth per task over its ``split`` ("val" or "test"), the skipped
    (undecodable) paths, and for tasks whose features report on the split (``TaskFeature.reports``)
    ``predictions`` (every deploy prediction) and the loader's per-task ``extras`` (e.g. ``boxes``)."""
    net.eval().to(device)
    scores, truth, skipped = defaultdict(list), defaultdict(list), defaultdict(set)
    kept = defaultdict(lambda: {"predictions": defaultdict(list), "extras": defaultdict(list)})
    reported = {task.name for task in cfg.tasks if any(f.reports(task.name) for f in net.features.values())}
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
            if name in reported:
                for key, value in net.task_predictions(name, outputs[name]).items():
                    kept[name]["predictions"][key].append(value.float().cpu().numpy())
                for key, value in task_entries(batch, name).items():
                    kept[name]["extras"][key].append(value.numpy())
    meter.close()
    data = {name: (np.concatenate(scores[name]), np.concatenate(truth[name])) for name in scores}
    details = {name: {part: {k: np.concatenate(v) for k, v in values.items()} for part, values in parts.items()}
               for name, parts in kept.items()}
    return data, {task: sorted(paths) for task, paths in skipped.items()}, details


def feature_reports(net: MultiTaskNet, task: str, details: dict, truth: np.ndarray) -> dict:
    """The entries of the task's features in its report (``TaskFeature.report``)."""
    entries = {key: feature.report(task, details["predictions"], truth, details["extras"])
               for key, feature in net.features.items() if feature.reports(task)}
    return {key: entry for key, entry in entries.items() if entry is not None}


def evaluate(net: MultiTaskNet, cfg: RegistryConfig, out_dir: str | Path, device: str = "cpu",
             checkpoint: str | Path | None = None, kept_thresholds: dict | None = None,
             val_picked: bool | None = None) -> dict:
    """Write ``metrics.json``, ``thresholds.json`` and PNG plots under ``out_dir``; return the metrics.
    With ``checkpoint``, ``evaluated.json`` records which file the thresholds were chosen for.
    ``kept_thresholds``: tasks whose thresholds are given, not chosen (a task carried over
    unchanged from a parent model keeps the parent's). ``val_picked``: whether val chose these weights
    (a tuning winner); None: a ``best_*`` file did, or the run's kept one with ``train.checkpoint: best``.

    Thresholds are always chosen on ``val``. A task with a ``test`` split is reported on it,
    at those thresholds; a task without one is reported on ``val`` and marked in-sample
    (``val`` also picked the thresholds, and the checkpoint where it is a val-picked ``best_*``
    one, which flatters the figures).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    val, skipped, details = predict_split(net, cfg, "val", device)
    has_test = any(task.test is not None for task in cfg.tasks)
    test, test_skipped, test_details = predict_split(net, cfg, "test", device) if has_test else ({}, {}, {})
    if val_picked is None:
        val_picked = Path(checkpoint).name.startswith("best_") if checkpoint else cfg.train.checkpoint == "best"
    report = {}
    for task in cfg.tasks:
        if task.name not in val:
            raise ValueError(f"task {task.name}: no validation image could be decoded")
        kind = kind_of(net.heads[task.name].kind)
        chosen = kind.report(task, *val[task.name], (kept_thresholds or {}).get(task.name))
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
            result.update(feature_reports(net, task.name, split_details[task.name], truth))
        result["kind"] = kind.name
        result["split"] = split
        result["in_sample"] = split == "val"
        result["val_picked_checkpoint"] = val_picked
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
        picked = "the checkpoint and the thresholds" if r.get("val_picked_checkpoint", True) else "the thresholds"
        if r.get("split") == "test":
            val = ", ".join(f"{k} {v:.3f}" for k, v in r["val_summary"].items() if k != "count")
            lines.append(f"{task}: on its test split ({r['count']} images; validation picked {picked}, {val} there)")
        elif r.get("in_sample"):
            lines.append(f"{task}: IN-SAMPLE on its validation split (it also picked {picked}; add data.test to the "
                         "task YAML for an honest figure)")
        lines += kind_of(r["kind"]).format(task, r)
        for key, feature in registered_features().items():
            if isinstance(r.get(key), dict):
                lines += feature.format_report(r[key])
        if r["skipped_images"]:
            lines.append(f"  skipped {len(r['skipped_images'])} undecodable images")
    return "\n".join(lines)
