"""CPU throughput of one shared multi-task model against separate single-task models.

    python benchmarks/multitask_cost.py [--backbone resnet50] [--size 224] [--batch 8]

The shared model runs the trunk once and only the per-task BN branches of the last level
(and the heads) once per task; separate models run everything once per task. Eval mode,
torch eager, batch of random images, median of timed repeats after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from cpu_usage import cpu_model

from waterdrop.config import load_registry
from waterdrop.model.multitask import MultiTaskNet


def write_binary_tasks(folder: Path, count: int) -> list[str]:
    """``count`` binary task YAMLs (no data behind them: for speed only); their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for t in range(count):
        task = {"name": f"task{t}", "head": {"type": "BinaryHead"}, "labels": ["positive"],
                "data": {"train": "unused.jsonl", "val": "unused.jsonl"}, "deploy": {"target": {"recall": 0.9}}}
        (folder / f"task{t}.yaml").write_text(yaml.safe_dump(task))
        names.append(f"task{t}.yaml")
    return names


def build(backbone: str, size: int, tasks: int, folder: Path) -> MultiTaskNet:
    names = write_binary_tasks(folder, tasks)
    registry = {"model": {"backbone": backbone, "input_size": size, "task_bn_stages": [-1]}, "tasks": names}
    (folder / "registry.yaml").write_text(yaml.safe_dump(registry))
    return MultiTaskNet(load_registry(folder / "registry.yaml")).eval()


@torch.no_grad()
def seconds_per_batch(models: list[MultiTaskNet], images: torch.Tensor, repeats: int) -> float:
    for model in models:
        model.forward_all(images)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for model in models:
            model.forward_all(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size)).float()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tasks in (1, 2, 4):
            model = build(args.backbone, args.size, tasks, Path(tmp) / f"shared{tasks}")
            rows.append((f"shared, {tasks} task(s)", tasks, seconds_per_batch([model], images, args.repeats)))
        separate = [build(args.backbone, args.size, 1, Path(tmp) / f"single{i}") for i in range(4)]
        rows.append(("4 separate single-task models", 4, seconds_per_batch(separate, images, args.repeats)))
    separate_speed = args.batch / rows[-1][2]
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}")
    print(f"{args.backbone} at {args.size} px, batch {args.batch}, eval, median of {args.repeats}")
    print("| setting | tasks served | ms / batch | images/s (all tasks) | vs 4 separate |")
    print("|---|---|---|---|---|")
    for name, tasks, seconds in rows:
        speed = args.batch / seconds
        print(f"| {name} | {tasks} | {seconds * 1000:.0f} | {speed:.1f} | {speed / separate_speed:.2f}x |")


if __name__ == "__main__":
    main()
