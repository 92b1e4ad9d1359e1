"""Ablation of the moderation recipes on one binary task: which technique buys what.

    python benchmarks/moderation_ablation.py [--registry R] [--task disgusting] [--seeds 0 1]
        [--epochs 6] [--backbone resnet18] [--input-size 112] [--out work_dirs/ablation]

Each row adds one technique to the row before (cumulative), trains from scratch, and
evaluates the best checkpoint: AP and ROC-AUC on the validation set, recall at the
threshold chosen for the task's target, and precision / AP at the task's deploy
prevalence. The mean-teacher pair hides part of the training labels (the hidden images
become the unlabeled pool) and compares with and without the teacher at the same labels.

Without ``--registry`` the demo data is generated with ``hard=True`` (small positive
regions, look-alike negatives everywhere), since the default demo split is too easy to
tell the techniques apart. Every row uses the same mild augmentations (``AUGMENT``): a
RandomResizedCrop down to 60 % of the area or erasing at 25 % often removes a positive
region of this size and turns the label into noise.
Validation data also picks the best epoch, which flatters every row alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import fresh_run_folder, load_base, machine, merge, save_report, table, write_run_registry  # noqa: E402

from waterdrop.data.demo import generate
from waterdrop.engine.train import run_training

AUGMENT = {"crop_scale": [0.85, 1.0], "hflip": True, "rotation": 15, "color": 0.2, "erasing": 0.1, "cutmix": 0.0}

# (row name, change to the previous row's task YAML, change to its model section)
ROWS = [
    ("plain softmax baseline", {"head": {"loss": "softmax", "pcb": None}, "sampler": "plain", "cascade": None,
                                "mean_teacher": None}, {"cbam": "none"}),
    ("+ focal + alpha x softmax loss", {"head": {"loss": "focal_softmax"}}, {}),
    ("+ CBAM in blocks", {}, {"cbam": "blocks"}),
    ("+ PCB parts (joined with global)", {"head": {"pcb": {"size": 2, "stride": 1, "join_global": True}}}, {}),
    ("+ balanced sampler (1/2 normal)", {"sampler": {"type": "balanced", "normal_fraction": 0.5}}, {}),
    ("  labels: only {kept:.0%} kept", {"hide_labels": True}, {}),
    ("  + mean teacher on the rest", {"mean_teacher": {"ema_decay": 0.99, "consistency_weight": 10.0,
                                                       "rampup_epochs": 2, "unlabeled_fraction": 0.5}}, {}),
    ("+ OHEM cascade (all labels)", {"hide_labels": False, "mean_teacher": None,
                                     "cascade": {"backbone": "resnet18", "hard_per_batch": 8}}, {}),
]


def split_labels(manifest: Path, keep: float, seed: int, out: Path) -> tuple[Path, Path]:
    """Keep ``keep`` of each label's lines labeled; the rest become an unlabeled manifest."""
    lines = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    kept, hidden = [], []
    for label in sorted({item["labels"][0] for item in lines}):
        group = [item for item in lines if item["labels"][0] == label]
        chosen = set(rng.permutation(len(group))[:max(1, round(keep * len(group)))].tolist())
        for i, item in enumerate(group):
            (kept if i in chosen else hidden).append(item)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, items in (("labeled.jsonl", kept), ("unlabeled.jsonl", hidden)):
        path = out / name
        path.write_text("".join(json.dumps({"image": str(manifest.parent / item["image"]),
                                            "labels": item["labels"]}) + "\n" for item in items))
        paths.append(path)
    return paths[0], paths[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", help="a registry to take the model, training settings and task from "
                                           "(default: the repository's, on hard demo data)")
    parser.add_argument("--task", default="disgusting", help="the binary task to ablate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--keep-labels", type=float, default=0.25, help="label fraction kept in the mean-teacher pair")
    parser.add_argument("--out", default="work_dirs/ablation")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    registry_path, base, cfg, task_cfg, task = load_base(args.registry, args.task)
    if args.registry:
        train, val = task_cfg.train, task_cfg.val
    else:
        data = out / "hard_demo"
        if not (data / "COMPLETE").is_file():
            generate(data, seed=0, hard=True)
        train, val = data / args.task / "train.jsonl", data / args.task / "val.jsonl"
    task["data"] = {"train": str(train), "val": str(val), "unlabeled": None}
    task["augment"] = dict(AUGMENT)
    model = {"backbone": args.backbone, "input_size": args.input_size, "pretrained": None}

    names = [name.format(kept=args.keep_labels) for name, _, _ in ROWS]
    results: dict[str, list[dict]] = {name: [] for name in names}
    for seed in args.seeds:
        current, current_model, hide = task, dict(model), False
        for i, (name, (_, change, model_change)) in enumerate(zip(names, ROWS)):
            change = dict(change)
            hide = change.pop("hide_labels", hide)
            current = merge(current, change, replace=("pcb", "sampler"))
            current_model.update(model_change)
            run_task = copy.deepcopy(current)
            folder = out / f"seed{seed}" / f"row{i}"
            if hide:
                labeled, unlabeled = split_labels(Path(train), args.keep_labels, seed, folder / "split")
                run_task["data"] = {"train": str(labeled), "val": str(val),
                                    "unlabeled": str(unlabeled) if run_task.get("mean_teacher") else None}
            registry = write_run_registry(base, current_model, run_task, folder, seed, args.epochs)
            start = time.perf_counter()
            report = run_training(registry, fresh_run_folder(folder), printer=lambda *a, **k: None)[args.task]
            row = {"ap": report["ap"], "roc_auc": report["roc_auc"], "recall": report["at_threshold"]["recall"],
                   "deploy_precision": report["deploy"]["precision"], "deploy_ap": report["deploy"]["ap"],
                   "minutes": (time.perf_counter() - start) / 60}
            results[name].append(row)
            print(f"seed {seed}  {name:40s}  AP {row['ap']:.3f}  recall {row['recall']:.3f}  "
                  f"deploy P {row['deploy_precision']:.3f}  ({row['minutes']:.1f} min)", flush=True)

    deploy = task_cfg.deploy
    lines = [f"Task `{args.task}`, {'data of ' + str(registry_path) if args.registry else 'hard demo split'}; "
             f"{args.backbone} at {args.input_size} px from scratch, {args.epochs} epochs, seeds {args.seeds}; "
             f"threshold for {deploy.target_metric} >= {deploy.target_value}, deploy prevalence {deploy.prevalence}. "
             f"Machine: {machine()}. Mean (min-max) over seeds.", ""]
    lines += table(names, results, [("ap", "AP"), ("roc_auc", "ROC-AUC"), ("recall", "recall at threshold"),
                                    ("deploy_precision", "precision at deploy prevalence"),
                                    ("deploy_ap", "AP at deploy prevalence")])
    save_report(out, "moderation_ablation", lines, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
