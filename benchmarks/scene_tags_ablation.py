"""Ablation of the scene-tag recipes: what repeat-factor sampling, focal loss, the SSD
small-object assist and the relation graph each buy.

    python benchmarks/scene_tags_ablation.py [--registry R] [--task scene_tags] [--seeds 0]
        [--epochs 8] [--backbone resnet18] [--input-size 112] [--out work_dirs/ablation_tags]

Rows are cumulative and each trains from scratch on the task's data (the demo tags by
default). Reported: mAP, micro F1 at the per-label thresholds before and after the
relation graph, the AP of the small-object tags (the detector classes, or glasses and
ball), and the detector's mAP@0.5 where it is on. The relation graph only changes
decisions, so it shows in F1, not in AP: its row is the previous run's F1 with the graph
applied.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import fresh_run_folder, load_base, machine, merge, save_report, table, write_run_registry  # noqa: E402

from waterdrop.data.demo import SMALL_OBJECTS, ensure_demo_data
from waterdrop.engine.train import run_training

ROWS = [
    ("baseline: BCE, plain sampler", {"head": {"loss": "bce"}, "detector": None, "sampler": "plain",
                                      "relations": None}),
    ("+ repeat-factor sampling", {"sampler": {"type": "repeat_factor", "threshold": 0.1, "function": "sqrt"}}),
    ("+ focal loss", {"head": {"loss": "focal", "gamma": 2.0}}),
    ("+ SSD small-object assist", {"detector": "from the task YAML"}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", help="registry to take the model, training settings and task from")
    parser.add_argument("--task", default="scene_tags")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--out", default="work_dirs/ablation_tags")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    registry_path, base, cfg, task_cfg, task = load_base(args.registry, args.task)
    detector = task.get("detector")
    relations = task.get("relations")
    if not args.registry:
        ensure_demo_data(cfg.demo_data)
    task["data"] = {"train": str(task_cfg.train), "val": str(task_cfg.val), "unlabeled": None}
    small = (detector or {}).get("classes", SMALL_OBJECTS)
    model = {"backbone": args.backbone, "input_size": args.input_size, "pretrained": None}

    names = [name for name, _ in ROWS] + ["+ relation graph (same run)"]
    results: dict[str, list[dict]] = {name: [] for name in names}
    for seed in args.seeds:
        current = task
        for i, (name, change) in enumerate(ROWS):
            if change.get("detector") == "from the task YAML":
                change = {"detector": detector}
            current = merge(current, change, replace=("sampler", "detector"))
            folder = out / f"seed{seed}" / f"row{i}"
            run_task = dict(current)
            if name == ROWS[-1][0]:
                run_task["relations"] = relations  # evaluated both ways in the same run
            registry = write_run_registry(base, model, run_task, folder, seed, args.epochs)
            start = time.perf_counter()
            report = run_training(registry, fresh_run_folder(folder), printer=lambda *a, **k: None)[args.task]
            row = {"map": report["map"], "f1": report["micro"]["f1"],
                   "small_ap": statistics.mean(report["labels"][c]["ap"] for c in small),
                   "det_map": report.get("detector", {}).get("map50", float("nan")),
                   "minutes": (time.perf_counter() - start) / 60}
            if "detector" in report:
                row["small_ap_tag_only"] = statistics.mean(report["detector"]["classes"][c]["ap_tag_only"]
                                                           for c in small)
            results[name].append(row)
            print(f"seed {seed}  {name:32s}  mAP {row['map']:.3f}  F1 {row['f1']:.3f}  "
                  f"small-object AP {row['small_ap']:.3f}  ({row['minutes']:.1f} min)", flush=True)
            if "micro_after_relations" in report:
                results[names[-1]].append({**row, "f1": report["micro_after_relations"]["f1"], "minutes": 0.0})

    lines = [f"Task `{args.task}`, {'data of ' + str(registry_path) if args.registry else 'demo tags'}; "
             f"{args.backbone} at {args.input_size} px from scratch, {args.epochs} epochs, seeds {args.seeds}; "
             f"per-label thresholds for the task's targets. Small objects: {', '.join(small)}. Machine: {machine()}. "
             "Mean (min-max) over seeds; nan = not applicable.", ""]
    lines += table(names, results, [("map", "mAP"), ("f1", "micro F1 at thresholds"),
                                    ("small_ap", "AP of small-object tags"), ("det_map", "detector mAP@0.5")])
    assisted = results[ROWS[-1][0]]
    if assisted and "small_ap_tag_only" in assisted[0]:
        lines += ["", "Same SSD run, small-object tag AP from the tag head alone: "
                  f"{statistics.mean(r['small_ap_tag_only'] for r in assisted):.3f}."]
    save_report(out, "scene_tags_ablation", lines, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
