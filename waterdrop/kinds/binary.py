"""Binary decisions (``BinaryHead``): one threshold, precision at the deploy prevalence."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from waterdrop.evaluation.metrics import average_precision, binary_report, roc_auc
from waterdrop.kinds.base import TaskKind, register_kind


@register_kind
class BinaryKind(TaskKind):
    name = "binary"
    threshold_key = "threshold"
    uses_prevalence = True
    samplers = ("plain", "balanced")
    result_fields = {"score": "float32", "threshold": "constant", "positive": "bool", "stage_scores": "scores",
                     "subclass": "string", "subclass_scores": "scores"}

    def validation_metrics(self, scores, truth):
        ap = average_precision(scores, truth)
        return {"ap": ap, "roc_auc": roc_auc(scores, truth)}, ap

    def report(self, task, scores, truth, thresholds=None):
        deploy = task.deploy
        return binary_report(scores, truth, deploy.prevalence, deploy.target_metric, deploy.target_value, thresholds)

    def thresholds(self, report):
        return report["threshold"]

    def summary(self, report):
        return {"count": report["count"], "AP": report["ap"]}

    def format(self, task_name, report):
        at, dep = report["at_threshold"], report["deploy"]
        lines = [f"{task_name}: AP {report['ap']:.3f}  ROC-AUC {report['roc_auc']:.3f}  threshold "
                 f"{report['threshold']:.3f} (target {report['target']})",
                 f"  {report.get('split', 'val')} mix ({report['positives']}/{report['count']} positive): "
                 f"P {at['precision']:.3f}  R {at['recall']:.3f}  F1 {at['f1']:.3f}"]
        if dep["prevalence"]:
            lines.append(f"  at deploy prevalence {dep['prevalence']:g}: P {dep['precision']:.3f}  "
                         f"R {dep['recall']:.3f}  AP {dep['ap']:.3f}")
        return lines

    def plot(self, out_dir: Path, task, report, scores, truth):
        from waterdrop.evaluation import plots

        plots.binary_pr(out_dir / f"{task.name}_pr.png", task.name, scores, truth, task.deploy.prevalence,
                        report["threshold"])
        plots.confusion(out_dir / f"{task.name}_confusion.png", task.name, report["at_threshold"],
                        report["threshold"])

    def runtime_result(self, entry, outputs, row, size):
        score = float(outputs["prob"][row])
        result = {"score": round(score, 6), "threshold": entry["threshold"], "positive": score >= entry["threshold"]}
        if "decision" in outputs:  # decided inside the graph (a feature of the task made it, e.g. two networks)
            result["positive"] = bool(outputs["decision"][row])
            result["stage_scores"] = [round(float(outputs[k][row]), 6) for k in ("stage1_prob", "stage2_prob")]
        if "subclass_prob" in outputs:
            probs = outputs["subclass_prob"][row]
            result["subclass"] = entry["labels"][int(np.argmax(probs))]
            result["subclass_scores"] = {label: round(float(p), 6) for label, p in zip(entry["labels"], probs)}
        return result

    def label_probability(self, scores, truth):
        return np.where(truth == 1, scores, 1 - scores)

    def decisions(self, entry):
        return ["positive"]

    def decide(self, entry, outputs):
        if "decision" in outputs:  # decided inside the graph (e.g. a cascade's two networks)
            return outputs["decision"].reshape(-1, 1).astype(bool)
        return super().decide(entry, outputs)

    def decision_truth(self, entry, names, missing):
        known = [entry["negative_label"], *entry["labels"]]
        unknown = [name for name in [*names, *missing] if name not in known]
        if unknown:
            raise ValueError(f"unknown label '{unknown[0]}'; known labels: {', '.join(known)}")
        if missing or len(names) > 1:
            raise ValueError(f"a binary task takes one label per image and no 'missing', got {names}")
        return np.array([int(bool(names) and names[0] != entry["negative_label"])])  # [] is a normal image
