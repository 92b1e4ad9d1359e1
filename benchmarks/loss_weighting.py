"""Task loss weighting on the demo's three tasks: fixed vs uncertainty vs GradNorm.

    python benchmarks/loss_weighting.py [--input-size 96] [--epochs 3] [--methods fixed uncertainty gradnorm]
        [--out work_dirs/loss_weighting]

A method is a ``train.loss_weighting`` value, or ``ROW={...}`` for a named row with settings,
e.g. ``'uncertainty_lr0.05={type: uncertainty, lr: 0.05}'``.

The repository's registry (three demo tasks, ImageNet EfficientNet-Lite0) at a smaller input
size so that the tasks are not all at AP 1.0 and a row takes minutes on a CPU; only
``train.loss_weighting`` changes between rows. Metrics are on each task's test split
(val picked the checkpoint and the thresholds); the learned weights of the last epoch come
from the run's ``results.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, demo_registry, train_and_evaluate  # noqa: E402

from waterdrop.data.demo import ensure_demo_data  # noqa: E402


def last_weights(run: Path, tasks: list[str]) -> dict[str, float]:
    with open(run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {t: float(rows[-1][f"{t}.weight"]) for t in tasks if rows[-1].get(f"{t}.weight")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["fixed", "uncertainty", "gradnorm"])
    parser.add_argument("--out", default=str(REPO / "work_dirs" / "loss_weighting"))
    args = parser.parse_args()
    ensure_demo_data(REPO / "demo_data")
    out = Path(args.out)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for method in args.methods:
        method, _, setting = method.partition("=")
        folder = out / method
        registry = demo_registry(folder, {"model": {"input_size": args.input_size},
                                          "train": {"epochs": args.epochs,
                                                    "loss_weighting": yaml.safe_load(setting) if setting else method}})
        result = train_and_evaluate(registry, folder)
        result["weights"] = last_weights(Path(result["run"]), list(result["metrics"]))
        result.update(input_size=args.input_size, epochs=args.epochs)
        results[method] = result
        out.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2))
        print(f"{method}: {result['metrics']}  weights {result['weights']}  train {result['train_seconds']:.0f} s",
              flush=True)
    tasks = list(next(iter(results.values()))["metrics"])
    print("\n| weighting | " + " | ".join(tasks) + " | mean | last-epoch weights | train s |")
    print("|---|" + "---|" * (len(tasks) + 3))
    for method, r in results.items():
        values = [r["metrics"][t] for t in tasks]
        weights = ", ".join(f"{t} {w:.2f}" for t, w in r["weights"].items()) or "1 each"
        print(f"| {method} | " + " | ".join(f"{v:.4f}" for v in values)
              + f" | {sum(values) / len(values):.4f} | {weights} | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
