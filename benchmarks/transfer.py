"""From scratch vs fine-tuned from packaged ImageNet weights, on real-photo quality tasks.

    python benchmarks/real_photos.py                      # builds work_dirs/real_photos once
    python benchmarks/transfer.py [--data work_dirs/real_photos] [--tasks collage jpeg_artifacts ...]
        [--rows scratch finetune] [--copy NEW=ROW] [--set ROW:dotted.key=value] [--out work_dirs/transfer]

Every task is trained alone, as a team would register it: one minimal task YAML (folder per
class, ``labels: [positive]``) under a copy of the repository's ``registry.yaml``. The
checkpoint and the threshold are chosen on ``val``; AP is reported on ``test``, whose source
photographs the run never saw. Rows:

* ``scratch``: the previous default (resnet18 at 112 px, random initialisation, 12 epochs,
  AdamW lr 0.002, ImageNet mean/std).
* ``finetune``: the repository's registry as it is (packaged ImageNet EfficientNet-Lite0).

``--copy NEW=ROW`` adds a row that starts as a copy of another, and ``--set
ROW:dotted.key=value`` changes one registry key of one row (the value is YAML), for trying
other recipes, e.g. ``--copy big=finetune --set big:model.input_size=160 --rows big``; keys
under ``task.`` change the task YAML (``--set big:task.augment.crop_scale=[0.9,1.0]``).
Training time is the wall time of the training loop alone (no evaluation), on this machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, fresh_run_folder, machine  # noqa: E402
from cpu_usage import Usage  # noqa: E402

from waterdrop.config import load_registry
from waterdrop.engine.checkpoint import best_checkpoint, load_net
from waterdrop.engine.train import build_runner
from waterdrop.evaluation.evaluate import evaluate

TASKS = ("collage", "jpeg_artifacts", "plain_background")
SCRATCH = {"model": {"backbone": "resnet18", "pretrained": None, "input_size": 112, "mean": [0.485, 0.456, 0.406],
                     "std": [0.229, 0.224, 0.225]},
           "train": {"epochs": 12, "warmup_epochs": 1, "freeze_trunk_epochs": 0,
                     "optimizer": {"lr": 0.002, "trunk_lr_mult": 1.0}}}


def task_yaml(name: str, data: Path) -> dict:
    """The minimal task file a team writes for a real-photo binary task."""
    return {"name": name, "head": {"type": "BinaryHead"}, "labels": ["positive"], "negative_label": "normal",
            "data": {split: str(data / name / split) for split in ("train", "val", "test")},
            "deploy": {"prevalence": 0.01, "target": {"recall": 0.95}}}


def set_key(registry: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        registry = registry.setdefault(key, {})
    registry[last] = value


def row_registries(base: dict, copies: list[str], sets: list[str], names: list[str]) -> dict[str, dict]:
    rows = {"scratch": copy.deepcopy(base), "finetune": copy.deepcopy(base)}
    for section, values in SCRATCH.items():
        for key, value in values.items():
            if isinstance(value, dict):
                rows["scratch"][section].setdefault(key, {}).update(value)
            else:
                rows["scratch"][section][key] = value
    for item in copies:
        new, old = item.split("=", 1)
        rows[new] = copy.deepcopy(rows[old])
    for item in sets:
        row, change = item.split(":", 1)
        key, value = change.split("=", 1)
        set_key(rows[row], key, yaml.safe_load(value))
    return {name: rows[name] for name in names}


def write_run_files(registry: dict, task: dict, folder: Path) -> Path:
    """``folder/registry.yaml`` training ``task`` alone; the registry's ``task.`` keys go into its YAML."""
    registry, task = copy.deepcopy(registry), copy.deepcopy(task)
    for key, value in registry.pop("task", {}).items():
        task[key] = {**task.get(key, {}), **value} if isinstance(value, dict) else value
    registry.update(demo_data=None, tasks=["task.yaml"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.yaml").write_text(yaml.safe_dump(task))
    (folder / "registry.yaml").write_text(yaml.safe_dump(registry))
    return folder / "registry.yaml"


def run_one(registry: dict, task: dict, folder: Path) -> dict:
    registry = copy.deepcopy(registry)
    registry["train"]["log_interval"] = 1000
    cfg = load_registry(write_run_files(registry, task, folder))
    runner = build_runner(cfg, fresh_run_folder(folder), printer=lambda *a, **k: None)
    with Usage() as usage:
        runner.train()
    train_seconds = usage.record["wall_s"]
    net, cfg, _ = load_net(best_checkpoint(folder / "run"))
    report = evaluate(net, cfg, folder / "run" / "eval")[task["name"]]
    return {"test_ap": report["ap"], "val_ap": report["val_summary"]["AP"], "test_roc_auc": report["roc_auc"],
            "recall_at_threshold": report["at_threshold"]["recall"],
            "precision_at_1_100": report["deploy"]["precision"], "train_seconds": train_seconds,
            "epochs": cfg.train.epochs, "input_size": cfg.model.input_size, "backbone": cfg.model.backbone,
            "train_cpu": usage.record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "work_dirs" / "real_photos"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--rows", nargs="+", default=["scratch", "finetune"])
    parser.add_argument("--copy", dest="copies", action="append", default=[], metavar="NEW=ROW",
                        help="a new row that starts as a copy of ROW")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="ROW:dotted.key=value",
                        help="change one registry key of one row (value in YAML)")
    parser.add_argument("--out", default=str(REPO / "work_dirs" / "transfer"))
    args = parser.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out)
    if not (data / "manifest.json").is_file():
        sys.exit(f"{data}: no real-photo data; run benchmarks/real_photos.py first")
    base = yaml.safe_load((REPO / "registry.yaml").read_text())
    rows = row_registries(base, args.copies, args.sets, args.rows)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name, registry in rows.items():
        for task in args.tasks:
            key = f"{name}/{task}"
            result = run_one(registry, task_yaml(task, data), out / name / task)
            result["machine"] = machine()
            results[key] = result
            out.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(results, indent=2))
            print(f"{key}: test AP {result['test_ap']:.4f} (val {result['val_ap']:.4f})  "
                  f"train {result['train_seconds']:.0f} s", flush=True)
    print("\n| recipe | task | test AP | val AP | test ROC-AUC | recall at thr | P at 1:100 | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        name, task = key.split("/")
        print(f"| {name} | {task} | {r['test_ap']:.4f} | {r['val_ap']:.4f} | {r['test_roc_auc']:.4f} | "
              f"{r['recall_at_threshold']:.3f} | {r['precision_at_1_100']:.3f} | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
