"""A candidate model against the one in production, task by task, and the release gate; torch-free.

Every task in both files is scored on its test split (val where it has none, and the record
says so) with both models on the same decoded images (an undecodable image is left out for
both). Per task: the kind's headline metric for both and a paired bootstrap 95% interval of
the difference (the same resampled images for both), each model's precision and recall at its
own thresholds on the split and at the deploy prevalence, decision flips (negative: right
before, wrong now; positive: the reverse; Yan et al., "Positive-Congruent Training", CVPR
2021), threshold drift, and per label for multi-label tasks. A task whose content hash is
the same in both files (its lineage) is unchanged and not scored again.

The gate: per task, the candidate's YAML ``deploy.max_metric_drop`` (the whole interval of
the difference must not lie below minus it: noise on a small split does not block, a real
drop does) and ``deploy.max_negative_flip_rate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waterdrop.config import RegistryConfig, TaskConfig
from waterdrop.kinds import kind_of
from waterdrop.runtime import Predictor
from waterdrop.scoring import calibration_images, score_outputs, task_metric

BOOTSTRAP_ROUNDS = 1000


@dataclass
class Model:
    """One side of a comparison: the file and its open predictor."""

    path: Path
    predictor: Predictor

    @property
    def entries(self) -> dict[str, dict]:
        return {entry["name"]: entry for entry in self.predictor.tasks}

    @property
    def preprocessing(self) -> dict:
        return self.predictor.meta["input"]


def bootstrap_differences(kind, old: np.ndarray, new: np.ndarray, truth: np.ndarray,
                          rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> list[float]:
    """metric(new) - metric(old) on bootstrap resamples of the images, the same resample for both
    models; a resample that cannot be scored (no positives) is left out."""
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(rounds):
        rows = rng.integers(0, len(truth), len(truth))
        before = kind.validation_metrics(old[rows], truth[rows])[1]
        after = kind.validation_metrics(new[rows], truth[rows])[1]
        if math.isfinite(before) and math.isfinite(after):
            differences.append(after - before)
    return differences


def percentile_interval(differences: list[float]) -> tuple[float, float]:
    """The 95% percentile interval of ``differences`` (NaN, NaN when there are none)."""
    if not differences:
        return float("nan"), float("nan")
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


def paired_interval(kind, old: np.ndarray, new: np.ndarray, truth: np.ndarray, rounds: int = BOOTSTRAP_ROUNDS,
                    seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of metric(new) - metric(old) over paired bootstrap resamples."""
    return percentile_interval(bootstrap_differences(kind, old, new, truth, rounds, seed))


def decision_flips(old: np.ndarray, new: np.ndarray, truth: np.ndarray, columns: list[str]) -> dict:
    """Negative and positive flips between two models' decisions (rows: images, columns:
    decisions) against the truth (-1: unknown, left out), in all and per column."""
    truth = truth.reshape(len(truth), -1)
    known = truth >= 0
    old_right, new_right = (old == truth) & known, (new == truth) & known
    negative, positive = old_right & ~new_right, ~old_right & new_right & known

    def counts(neg: np.ndarray, pos: np.ndarray, decided: int) -> dict:
        return {"decisions": decided, "negative_flips": int(neg.sum()), "positive_flips": int(pos.sum()),
                "negative_flip_rate": float(neg.sum() / decided) if decided else float("nan"),
                "positive_flip_rate": float(pos.sum() / decided) if decided else float("nan")}

    result = counts(negative, positive, int(known.sum()))
    if len(columns) > 1:
        result["per_label"] = {name: counts(negative[:, c], positive[:, c], int(known[:, c].sum()))
                               for c, name in enumerate(columns)}
    result["negative_rows"] = np.nonzero(negative.any(axis=1))[0].tolist()
    return result


def _at_thresholds(kind, task: TaskConfig, scores: np.ndarray, truth: np.ndarray, thresholds) -> dict:
    """Precision and recall at a model's own thresholds on the split and at the deploy
    prevalence, as its kind reports them."""
    report = kind.report(task, scores, truth, thresholds)
    keep = ("at_threshold", "deploy", "micro", "mae", "accuracy")
    picked = {key: report[key] for key in keep if key in report}
    if "labels" in report and isinstance(report["labels"], dict):
        picked["per_label"] = {label: {k: v for k, v in entry.items() if k in ("ap", "precision", "recall")}
                               for label, entry in report["labels"].items()}
    return picked


def _drift(old, new):
    if old is None or new is None:
        return None
    if isinstance(old, dict):
        return {label: float(new[label]) - float(old[label]) for label in old if label in new}
    return float(new) - float(old)


def gated_flip_rate(flips: dict) -> tuple[float, str]:
    """The negative-flip rate the gate reads, and what it is: the task's own, or for a multi-label
    task its worst label's (each tag is a decision some team is served)."""
    if "per_label" in flips:
        label, worst = max(flips["per_label"].items(), key=lambda item: np.nan_to_num(item[1]["negative_flip_rate"]))
        return worst["negative_flip_rate"], f"label {label}: {worst['negative_flips']} of {worst['decisions']}"
    return flips["negative_flip_rate"], f"{flips['negative_flips']} of {flips['decisions']} decisions"


def _budget_verdict(task: TaskConfig, result: dict) -> list[str]:
    """Why a compared task is over its budget (empty: within it). A metric drop counts when it is
    real (the whole 95% interval of the change lies below zero) and larger than the budget: noise
    on a small split, whose interval spans zero, never blocks."""
    deploy, problems = task.deploy, []
    low, high = result["difference_interval"]
    if math.isfinite(high) and high < 0 and result["difference"] < -deploy.max_metric_drop:
        problems.append(f"{result['metric']} fell by {-result['difference']:.4f}, more than "
                        f"{deploy.max_metric_drop} (95% interval of the change [{low:.4f}, {high:.4f}], below zero)")
    rate, what = gated_flip_rate(result["flips"])
    if math.isfinite(rate) and rate > deploy.max_negative_flip_rate:
        problems.append(f"negative flips {what} ({rate:.2%}) exceed {deploy.max_negative_flip_rate:.2%}")
    return problems


def compare_task(old: Model, new: Model, task: TaskConfig, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0,
                 batch_size: int = 16) -> tuple[dict, dict]:
    """The comparison of one task present in both models (see the module docstring), and the
    arrays behind it (scores, truth, paths) for plots and contact sheets."""
    before, after = old.entries[task.name], new.entries[task.name]
    kind = kind_of(after["kind"])
    split, source = ("test", task.test) if task.test is not None else ("val", task.val)
    keys = ["prob"] + (["decision"] if "decision" in before["outputs"] and "decision" in after["outputs"] else [])
    outputs, truth, bad, paths = score_outputs({"deployed": old.predictor, "candidate": new.predictor}, after, source,
                                               keys, batch_size)
    scores = {side: outputs[side]["prob"] for side in outputs}
    measured = {side: task_metric(after, scores[side], truth) for side in scores}
    metric = measured["candidate"][0]
    metrics = {side: value for side, (_, value) in measured.items()}
    differences = bootstrap_differences(kind, scores["deployed"], scores["candidate"], truth, rounds, seed)
    decided = {side: kind.decide(entry, outputs[side]) for side, entry in (("deployed", before),
                                                                            ("candidate", after))}
    columns = kind.decisions(after) or ["grade"]
    thresholds = {side: entry.get(kind.threshold_key) if kind.threshold_key else None
                  for side, entry in (("deployed", before), ("candidate", after))}
    result = {
        "status": "compared", "kind": kind.name, "split": split, "source": str(source),
        "split_note": None if split == "test" else "no test split: compared on val, which chose the thresholds",
        "images": int(len(truth)), "undecodable": len(bad), "metric": metric,
        "deployed": metrics["deployed"], "candidate": metrics["candidate"],
        "difference": metrics["candidate"] - metrics["deployed"],
        "difference_interval": percentile_interval(differences),
        "bootstrap_rounds": rounds,
        "bootstrap_rounds_scored": len(differences),
        "at_own_thresholds": {side: _at_thresholds(kind, task, scores[side], truth, thresholds[side])
                              for side in scores} if kind.threshold_key else None,
        "thresholds": thresholds, "threshold_drift": _drift(thresholds["deployed"], thresholds["candidate"]),
        "flips": decision_flips(decided["deployed"], decided["candidate"], truth, columns),
    }
    if not kind.threshold_key:  # graded: how the grades moved
        grades = len(after["labels"])
        confusion = np.zeros((grades, grades), dtype=np.int64)
        np.add.at(confusion, (decided["deployed"][:, 0], decided["candidate"][:, 0]), 1)
        result["grade_changes"] = {"rows: deployed grade, columns: candidate grade": confusion.tolist()}
    arrays = {"scores": scores, "truth": truth, "paths": paths, "decided": decided}
    return result, arrays


def pool_changes(old: Model, new: Model, tasks: list[str], sources: list[Path], count: int, seed: int = 0,
                 batch_size: int = 16) -> dict:
    """How many of ``count`` sampled pool images change decision, per task: what partner teams
    see the day after the release."""
    sizes = {old.predictor.size, new.predictor.size}
    sampled = {size: calibration_images(sources, count, size, seed) for size in sizes}
    images, undecodable = sampled[new.predictor.size]
    changes = {}
    for name in tasks:
        decided = {}
        for side, model in (("deployed", old), ("candidate", new)):
            entry = model.entries[name]
            kind = kind_of(entry["kind"])
            batch = sampled[model.predictor.size][0]
            keys = [key for key in ("prob", "decision") if key in entry["outputs"]]
            chunks = [model.predictor.outputs(batch[i:i + batch_size].astype(np.float32),
                                              [entry["outputs"][k] for k in keys])
                      for i in range(0, len(batch), batch_size)]
            outputs = {k: np.concatenate([c[entry["outputs"][k]] for c in chunks]) for k in keys}
            decided[side] = kind.decide(entry, outputs)
        changed = (decided["deployed"] != decided["candidate"]).any(axis=1)
        changes[name] = {"changed": int(changed.sum()), "rate": float(changed.mean()) if len(changed) else float("nan")}
    return {"sampled": len(images), "undecodable": len(undecodable), "requested": count,
            "sources": list(map(str, sources)), "tasks": changes}


def _same_decisions(old: Model, new: Model, name: str) -> bool:
    """Whether a task's outputs and decisions are the same in both files without scoring them:
    the same content hash (its lineage) and the same thresholds, relations, input and precision."""
    before, after = old.entries[name], new.entries[name]
    keys = ("hash", "threshold", "thresholds", "relations", "outputs")
    return (bool(before.get("hash")) and all(before.get(key) == after.get(key) for key in keys)
            and old.preprocessing == new.preprocessing
            and old.predictor.meta.get("precision", "fp32") == new.predictor.meta.get("precision", "fp32"))


def compare(old: Model, new: Model, cfg: RegistryConfig, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0,
            pool: list[Path] | None = None, pool_size: int = 2000, batch_size: int = 16) -> tuple[dict, dict]:
    """The whole comparison record (JSON-ready) and, per compared task, its arrays."""
    before, after = old.entries, new.entries
    configs = {task.name: task for task in cfg.tasks}
    record = {"deployed": str(old.path), "candidate": str(new.path),
              "deployed_model_hash": old.predictor.meta.get("lineage", {}).get("model_hash"),
              "candidate_model_hash": new.predictor.meta.get("lineage", {}).get("model_hash"),
              "added": [n for n in after if n not in before], "retired": [n for n in before if n not in after],
              "notes": [], "tasks": {}}
    if old.preprocessing != new.preprocessing:
        same = old.preprocessing["normalization"] == new.preprocessing["normalization"]
        record["notes"].append(f"the models prepare images differently (deployed {old.preprocessing['size']} px, "
                               f"candidate {new.preprocessing['size']} px, normalisation "
                               f"{'the same' if same else 'different'}): each model was given the images as it "
                               "prepares them")
    arrays = {}
    for name in [n for n in after if n in before]:
        old_entry, new_entry = before[name], after[name]
        identity = ("labels", "negative_label", "kind")
        if any(old_entry.get(key) != new_entry.get(key) for key in identity):
            record["tasks"][name] = {"status": "refused", "why": (
                f"its labels or kind differ between the models (deployed {old_entry['kind']} {old_entry['labels']}, "
                f"candidate {new_entry['kind']} {new_entry['labels']}): its scores do not mean the same thing, so "
                "they are not compared")}
            continue
        if _same_decisions(old, new, name):
            record["tasks"][name] = {"status": "unchanged", "hash": new_entry["hash"], "verdict": "pass",
                                     "why": "its content hash, thresholds, relations, input and precision are the same "
                                            "in both files: the same outputs and decisions"}
            continue
        task = configs.get(name)
        if task is None or task.labels != new_entry["labels"] or task.negative_label != new_entry["negative_label"]:
            record["tasks"][name] = {"status": "refused", "why": (
                f"{cfg.file} has no task of this name with the model's labels: no data to compare it on")}
            continue
        try:
            result, arrays[name] = compare_task(old, new, task, rounds, seed, batch_size)
        except ValueError as err:  # its split cannot be read or decoded: the others are still compared
            record["tasks"][name] = {"status": "refused", "why": str(err)}
            continue
        problems = _budget_verdict(task, result)
        if not math.isfinite(result["deployed"]) or not math.isfinite(result["candidate"]):
            result["metric_note"] = (f"{result['metric']} cannot be measured on this split (no positives?): the "
                                     "metric part of the gate was not applied")
        result.update(verdict="over budget" if problems else "pass", problems=problems,
                      budget={"max_metric_drop": task.deploy.max_metric_drop,
                              "max_negative_flip_rate": task.deploy.max_negative_flip_rate})
        record["tasks"][name] = result
    if pool:
        shared = [n for n, r in record["tasks"].items() if r["status"] == "compared"]
        try:
            record["pool"] = pool_changes(old, new, shared, pool, pool_size, seed, batch_size)
        except ValueError as err:
            record["notes"].append(f"the pool was not measured: {err}")
    failed = [n for n, r in record["tasks"].items() if r.get("verdict") == "over budget"]
    record["over_budget"] = failed
    record["gate"] = "fail" if failed else "pass"
    return record, arrays
