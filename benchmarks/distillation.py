"""Knowledge distillation: student alone vs student + JS vs student + KL, with the teacher's own figures.

    python benchmarks/distillation.py --suite demo [--input-size 64] [--epochs 3]
    python benchmarks/real_photos.py && python benchmarks/distillation.py --suite real [--tasks collage]
    common: [--teacher-backbone tf_efficientnet_lite2] [--teacher-input-size PX] [--teacher-epochs N]
            [--teacher RUN] [--weight 1.0] [--temperature 2.0]
            [--rows teacher student js kl js_slow] [--out work_dirs/distillation]

The student is the shipped model (the repository's registry: ImageNet EfficientNet-Lite0);
the teacher is the same registry with a bigger backbone (ImageNet EfficientNet-Lite2), at the
student's input size and schedule unless told otherwise, trained first (or given with
``--teacher``). Every student row has the same data, epochs and learning rate; the JS and KL
rows add ``train.distillation`` with the teacher's run folder. ``js_slow`` is the recipe
practitioners report for JS: a 10x lower learning rate and twice the epochs (not run by
default). ``demo`` trains the three demo tasks jointly; ``real`` trains each real-photo task
alone, as a team would register it. Metrics are on each task's test split (val picked the
checkpoint and the thresholds); training time is the training loop's wall time, the
teacher's forward passes included.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, demo_registry, machine, merge, train_and_evaluate  # noqa: E402
from transfer import run_one, task_yaml  # noqa: E402

from waterdrop.data.demo import ensure_demo_data  # noqa: E402

ROWS = ("teacher", "student", "js", "kl", "js_slow")


def row_changes(row: str, args, teacher_run: str | None) -> dict:
    changes = {"model": {"input_size": args.input_size}, "train": {"epochs": args.epochs}}
    if row == "teacher":
        changes = {"model": {"input_size": args.teacher_input_size, "backbone": args.teacher_backbone},
                   "train": {"epochs": args.teacher_epochs}}
    elif row in ("js", "kl", "js_slow"):
        changes["train"]["distillation"] = {"teacher": teacher_run, "divergence": row[:2], "weight": args.weight,
                                            "temperature": args.temperature}
    if row == "js_slow":
        base = yaml.safe_load((REPO / "registry.yaml").read_text())["train"]
        changes["train"].update(epochs=2 * args.epochs, optimizer={"lr": base["optimizer"]["lr"] / 10})
    return changes


def run_row(row: str, args, out: Path, teacher_runs: dict[str, str]) -> dict:
    """Train one row; the teacher row records its run folder(s) in ``teacher_runs``."""
    if args.suite == "demo":
        folder = out / "demo" / row
        registry = demo_registry(folder, row_changes(row, args, teacher_runs.get("demo")))
        result = train_and_evaluate(registry, folder)
        if row == "teacher":
            teacher_runs["demo"] = result["run"]
        return result
    base = yaml.safe_load((REPO / "registry.yaml").read_text())
    metrics, seconds = {}, 0.0
    for task in args.tasks:
        folder = out / "real" / row / task
        registry = merge(base, row_changes(row, args, teacher_runs.get(task)))
        result = run_one(registry, task_yaml(task, Path(args.data).resolve()), folder)
        metrics[task], seconds = result["test_ap"], seconds + result["train_seconds"]
        if row == "teacher":
            teacher_runs[task] = str(folder / "run")
    return {"metrics": metrics, "train_seconds": seconds, "machine": machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["demo", "real"], required=True)
    parser.add_argument("--tasks", nargs="+", default=["collage"], help="real-photo tasks (suite real)")
    parser.add_argument("--data", default=str(REPO / "work_dirs" / "real_photos"))
    parser.add_argument("--input-size", type=int, default=None, help="default: 64 (demo), 128 (real)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--teacher-backbone", default="tf_efficientnet_lite2")
    parser.add_argument("--teacher-input-size", type=int, help="default: the student's")
    parser.add_argument("--teacher-epochs", type=int, help="default: the student's")
    parser.add_argument("--teacher", help="an already trained teacher run (suite demo) instead of the teacher row")
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--rows", nargs="+", default=list(ROWS[:4]), choices=ROWS)
    parser.add_argument("--out", default=str(REPO / "work_dirs" / "distillation"))
    args = parser.parse_args()
    args.input_size = args.input_size or (64 if args.suite == "demo" else 128)
    args.teacher_input_size = args.teacher_input_size or args.input_size
    args.teacher_epochs = args.teacher_epochs or args.epochs
    if args.suite == "demo":
        ensure_demo_data(REPO / "demo_data")
    elif not (Path(args.data) / "manifest.json").is_file():
        sys.exit(f"{args.data}: no real-photo data; run benchmarks/real_photos.py first")
    out = Path(args.out).resolve()  # the teacher's run folder is written into registries elsewhere
    results_file = out / f"{args.suite}.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    teacher_runs = {k: str(Path(v).resolve()) for k, v in results.get("teacher", {}).get("runs", {}).items()}
    if args.teacher:
        teacher_runs = {"demo": str(Path(args.teacher).resolve())}
    for row in args.rows:
        if row == "teacher" and args.teacher:
            continue
        if row in ("js", "kl", "js_slow") and not teacher_runs:
            sys.exit("no teacher: include the teacher row or give --teacher RUN")
        result = run_row(row, args, out, teacher_runs)
        changes = row_changes(row, args, None)
        result.update(input_size=changes["model"]["input_size"], epochs=changes["train"]["epochs"])
        if row == "teacher":
            result["runs"] = dict(teacher_runs)
        else:
            result.update(weight=args.weight, temperature=args.temperature)
        results[row] = result
        out.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2))
        print(f"{row}: {result['metrics']}  train {result['train_seconds']:.0f} s", flush=True)
    tasks = list(next(iter(results.values()))["metrics"])
    print(f"\n| row ({args.suite}) | px | epochs | " + " | ".join(tasks) + " | train s |")
    print("|---|---|---|" + "---|" * (len(tasks) + 1))
    for row, r in results.items():
        print(f"| {row} | {r['input_size']} | {r['epochs']} | " + " | ".join(f"{r['metrics'][t]:.4f}" for t in tasks)
              + f" | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
