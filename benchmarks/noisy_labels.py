"""How well O2U-Net ranking finds flipped training labels, and what cleaning gives back.

    python benchmarks/real_photos.py     # builds work_dirs/real_photos once
    python benchmarks/noisy_labels.py [--tasks disgusting collage jpeg_artifacts] [--noise 0.1 0.2]
        [--input-size 128] [--epochs 3] [--normal-epochs 2] [--cycles 3] [--cycle-epochs 2] [--seed 0]

Per task and noise rate, a seeded share of the training labels is flipped (binary:
positive to normal; normal to positive, or to a random sub-class where the task has
them). Then:

* ranking: ``find_noisy``'s O2U-Net run (from the registry's ImageNet weights: a normal
  phase, then the cycles), scored by the precision of its top 5 % (the share truly
  flipped) and the recall of the flipped in the top 5 % and in the top r % (r = the noise
  rate), against two plain rankings: the per-sample loss of the last epoch of the normal
  phase (a normally trained network), and of the last epoch of the whole run;
* retraining: the task trained as usual on the noisy labels, on the noisy labels minus the
  top r % of the ranking (``--drop``, as a team would after estimating the noise rate from
  a check of the top of the list), and on the clean labels; AP on the test split, whose
  labels (like val's) are never flipped.

"disgusting" is the built-in demo task (demo_data/, generated on first use); the others
are real-photo tasks from ``benchmarks/real_photos.py``. Every task is trained alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, machine  # noqa: E402
from cpu_usage import Usage  # noqa: E402
from transfer import run_one, task_yaml  # noqa: E402

from waterdrop.config import load_registry
from waterdrop.curation.noisy import O2USettings, highest_first, rank
from waterdrop.curation.sample_losses import record_sample_losses
from waterdrop.data.demo import ensure_demo_data
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.records import Record, read_records, write_manifest

DEMO_TASKS = ("disgusting", "thriller")


def base_task(name: str, real_photos: Path) -> dict:
    """The task YAML with absolute data paths: the repository's for demo tasks, the
    minimal real-photo one otherwise."""
    if name in DEMO_TASKS:
        ensure_demo_data(REPO / "demo_data")
        task = yaml.safe_load((REPO / "tasks" / f"{name}.yaml").read_text())
        task["data"] = {split: str(REPO / "demo_data" / name / f"{split}.jsonl") for split in ("train", "val", "test")}
        return task
    return task_yaml(name, real_photos)


def flip_labels(records: list[Record], negative: str, labels: list[str], rate: float,
                seed: int) -> tuple[list[Record], set[int]]:
    """A copy of ``records`` with a seeded ``rate`` of them given a wrong label."""
    rng = np.random.default_rng(seed)
    flipped = set(rng.choice(len(records), round(rate * len(records)), replace=False).tolist())
    noisy = []
    for i, record in enumerate(records):
        record = copy.copy(record)
        if i in flipped:
            positive = any(label != negative for label in record.labels)
            record.labels = [negative] if positive else [labels[rng.integers(len(labels))]]
        noisy.append(record)
    return noisy, flipped


def ranking_quality(order: np.ndarray, flipped: set[int], rate: float) -> dict:
    n = len(order)
    top5 = set(order[:round(0.05 * n)].tolist())
    top_r = set(order[:len(flipped)].tolist())
    return {"precision_top5": len(top5 & flipped) / max(1, len(top5)),
            "recall_top5": len(top5 & flipped) / max(1, len(flipped)),
            "recall_top_r": len(top_r & flipped) / max(1, len(flipped))}


def write_registry(registry: dict, task: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.yaml").write_text(yaml.safe_dump(task))
    registry = copy.deepcopy(registry)
    registry.update(demo_data=None, tasks=["task.yaml"])
    (folder / "registry.yaml").write_text(yaml.safe_dump(registry))
    return folder / "registry.yaml"


def one_noise_rate(registry: dict, task: dict, records: list[Record], rate: float, settings: O2USettings,
                   seed: int, folder: Path) -> dict:
    noisy, flipped = flip_labels(records, task["negative_label"], task["labels"], rate, seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(noisy, folder / "noisy_train.jsonl")
    noisy_task = copy.deepcopy(task)
    noisy_task["data"]["train"] = str(folder / "noisy_train.jsonl")
    cfg = load_registry(write_registry(registry, noisy_task, folder / "o2u"))
    torch.manual_seed(cfg.train.seed)
    with Usage() as usage:
        recorded = record_sample_losses(MultiTaskNet(cfg), cfg, task["name"], settings.phases(cfg.train.lr),
                                        printer=lambda message: print("  " + message, flush=True))
    o2u_seconds = usage.record["wall_s"]
    ranking = rank(recorded)
    result = {"noise": rate, "train_images": len(records), "flipped": len(flipped), "o2u_seconds": o2u_seconds,
              "o2u_cpu": usage.record,
              "o2u": ranking_quality(ranking.order, flipped, rate),
              "final_normal_loss": ranking_quality(highest_first(ranking.final_loss), flipped, rate),
              "last_epoch_loss": ranking_quality(highest_first(recorded.losses[-1]), flipped, rate)}
    dropped = set(ranking.order[:len(flipped)].tolist())
    write_manifest([r for i, r in enumerate(noisy) if i not in dropped], folder / "cleaned_train.jsonl")
    for name, manifest in (("noisy", "noisy_train.jsonl"), ("cleaned", "cleaned_train.jsonl")):
        run_task = copy.deepcopy(task)
        run_task["data"]["train"] = str(folder / manifest)
        result[f"{name}_ap"] = run_one(registry, run_task, folder / name)["test_ap"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["disgusting", "collage", "jpeg_artifacts"])
    parser.add_argument("--noise", nargs="+", type=float, default=[0.1, 0.2])
    parser.add_argument("--data", default=str(REPO / "work_dirs" / "real_photos"))
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the retraining runs")
    parser.add_argument("--normal-epochs", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--cycle-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "work_dirs" / "noisy_labels"))
    args = parser.parse_args()
    out, data = Path(args.out).resolve(), Path(args.data).resolve()  # task YAMLs need absolute paths
    registry = yaml.safe_load((REPO / "registry.yaml").read_text())
    registry["model"]["input_size"] = args.input_size
    registry["train"].update(epochs=args.epochs, seed=args.seed, log_interval=1000)
    settings = O2USettings(args.normal_epochs, args.cycles, args.cycle_epochs)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in args.tasks:
        task = base_task(name, data)
        records = read_records(Path(task["data"]["train"]), [task["negative_label"], *task["labels"]])
        clean_key = f"{name}/clean"
        if clean_key not in results:
            results[clean_key] = {"clean_ap": run_one(registry, copy.deepcopy(task), out / name / "clean")["test_ap"]}
            out.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(results, indent=2))
        for rate in args.noise:
            key = f"{name}/{rate}"
            print(f"{key}: {round(rate * len(records))} of {len(records)} training labels flipped", flush=True)
            results[key] = one_noise_rate(registry, task, records, rate, settings, args.seed,
                                          out / name / f"noise{rate}")
            results[key].update(machine=machine(), input_size=args.input_size, epochs=args.epochs,
                                o2u_epochs=f"{args.normal_epochs} normal + {args.cycles}x{args.cycle_epochs} cyclic")
            out.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(results, indent=2))
            print(json.dumps(results[key], indent=1), flush=True)
    lines = ["| task | noise | top-5 % precision: O2U / final normal-epoch loss / last-epoch loss | "
             "recall in top r %: O2U / normal / last | test AP noisy | cleaned | clean | O2U run s |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        name, rate = key.split("/")
        if rate == "clean":
            continue
        q = [r[k] for k in ("o2u", "final_normal_loss", "last_epoch_loss")]
        lines.append(f"| {name} | {float(rate):.0%} | " + " / ".join(f"{x['precision_top5']:.2f}" for x in q) + " | "
                     + " / ".join(f"{x['recall_top_r']:.2f}" for x in q)
                     + f" | {r['noisy_ap']:.3f} | {r['cleaned_ap']:.3f} | {results[name + '/clean']['clean_ap']:.3f}"
                     f" | {r['o2u_seconds']:.0f} |")
    text = "\n".join(lines)
    (out / "report.md").write_text(f"Machine: {machine()}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
