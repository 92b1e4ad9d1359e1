"""What the release comparison sees on real photographs: seed noise, a relabelled retrain, and
positive-congruent training.

    python benchmarks/real_photos.py                # builds work_dirs/real_photos once
    python benchmarks/release.py [--task collage] [--noise 0.1] [--out work_dirs/release]

The model in production is trained jointly on the three real-photo tasks, with ``--noise`` of
``--task``'s training labels flipped (seeded): the labels a team later corrects. Compared with it
(``tools/compare.py``'s comparison, on the test splits, whose labels are right):

* ``seed``: the same training with another seed: what noise looks like, to set budgets by;
* ``relabel``: ``--task`` retrained on the corrected labels (``tools/train.py --from``): the
  other tasks are carried over unchanged;
* ``relabel_pct``: the same with positive-congruent training (``train.distillation`` from the
  production run with ``positive_congruent: true``).

Per comparison and task: AP of both, the change with its paired bootstrap 95% interval, the
negative- and positive-flip rates, and the gate's verdict at the default budgets.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, machine  # noqa: E402
from task_lifecycle import write_registry  # noqa: E402
from transfer import TASKS, task_yaml  # noqa: E402

from waterdrop.engine.checkpoint import best_checkpoint, load_net
from waterdrop.engine.train import run_training
from waterdrop.export import export_onnx
from waterdrop.release.compare import Model, compare
from waterdrop.release.report import write_report
from waterdrop.runtime import Predictor
from waterdrop.scoring import load_config


def noisy_manifest(data: Path, task: str, noise: float, out: Path, seed: int = 0) -> tuple[Path, int]:
    """A JSONL manifest of ``task``'s training folder with a ``noise`` fraction of labels flipped."""
    rows = [(path, label) for label in ("normal", "positive")
            for path in sorted((data / task / "train" / label).iterdir())]
    flipped = set(random.Random(seed).sample(range(len(rows)), round(noise * len(rows))))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for i, (path, label) in enumerate(rows):
            if i in flipped:
                label = "normal" if label == "positive" else "positive"
            f.write(json.dumps({"image": str(path), "labels": [] if label == "normal" else ["positive"]}) + "\n")
    return out, len(flipped)


def train(folder: Path, task_yamls: list[dict], train_changes: dict | None = None, **plan) -> float:
    """One run unless finished before; its wall time (0 when it was there)."""
    if (folder / "run" / "model.onnx").is_file():
        return 0.0
    registry = write_registry(folder, task_yamls)
    if train_changes:
        text = yaml.safe_load(registry.read_text())
        text["train"].update(train_changes)
        registry.write_text(yaml.safe_dump(text))
    start = time.perf_counter()
    run_training(registry, folder / "run", printer=lambda *a, **k: None, **plan)
    seconds = time.perf_counter() - start
    net, cfg, meta = load_net(best_checkpoint(folder / "run"))
    thresholds = json.loads((folder / "run" / "eval" / "thresholds.json").read_text())
    export_onnx(net, cfg, thresholds, folder / "run" / "model.onnx", lineage=meta.get("lineage"))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "work_dirs" / "real_photos"))
    parser.add_argument("--task", default="collage", help="the task whose labels are corrected")
    parser.add_argument("--noise", type=float, default=0.1, help="fraction of its training labels flipped")
    parser.add_argument("--out", default=str(REPO / "work_dirs" / "release"))
    args = parser.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    if not (data / "manifest.json").is_file():
        sys.exit(f"{data}: no real-photo data; run benchmarks/real_photos.py first")
    clean = {name: task_yaml(name, data) for name in TASKS}
    manifest, flipped = noisy_manifest(data, args.task, args.noise, out / "noisy" / f"{args.task}.jsonl")
    noisy = {**clean, args.task: {**clean[args.task], "data": {**clean[args.task]["data"], "train": str(manifest)}}}
    seconds = {"production": train(out / "production", list(noisy.values()))}
    production = out / "production" / "run"
    pct = {"teacher": str(production), "positive_congruent": True}
    candidates = {  # the retrains first: they are quick (one task on a frozen trunk)
        "relabel": lambda: train(out / "relabel", list(clean.values()), parent=production, tasks=[args.task]),
        "relabel_pct": lambda: train(out / "relabel_pct", list(clean.values()), {"distillation": pct},
                                     parent=production, tasks=[args.task]),
        "seed": lambda: train(out / "seed", list(noisy.values()), {"seed": 1}),
    }
    deployed_file = production / "model.onnx"
    deployed = Model(deployed_file, Predictor(deployed_file))
    results = {"machine": machine(), "task": args.task, "noise": args.noise, "flipped_labels": flipped,
               "seconds": seconds, "comparisons": {}}
    for name, run in candidates.items():
        seconds[name] = run()
        cfg = load_config(out / "relabel" / "run")  # clean labels on every split
        candidate_file = out / name / "run" / "model.onnx"
        record, arrays = compare(deployed, Model(candidate_file, Predictor(candidate_file)), cfg)
        write_report(record, arrays, out / name / "compare")
        results["comparisons"][name] = record
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        print(f"{name}: gate {record['gate']}", flush=True)
    print(f"\nproduction: {args.task} trained with {flipped} of its training labels flipped ({args.noise:.0%})\n")
    print("| candidate | task | AP deployed | AP candidate | change [95% interval] | negative flips | positive flips "
          "| gate |")
    print("|---|---|---|---|---|---|---|---|")
    for name, record in results["comparisons"].items():
        for task, r in record["tasks"].items():
            if r["status"] != "compared":
                print(f"| {name} | {task} | - | - | {r['status']} (same hash) | - | - | {r['verdict']} |")
                continue
            low, high = r["difference_interval"]
            flips = r["flips"]
            print(f"| {name} | {task} | {r['deployed']:.4f} | {r['candidate']:.4f} | {r['difference']:+.4f} "
                  f"[{low:+.4f}, {high:+.4f}] | {flips['negative_flips']} ({flips['negative_flip_rate']:.2%}) | "
                  f"{flips['positive_flips']} ({flips['positive_flip_rate']:.2%}) | {r['verdict']} |")


if __name__ == "__main__":
    main()
