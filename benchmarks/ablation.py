"""Shared pieces of the ablation benchmarks: cumulative config rows, run registries, tables."""

from __future__ import annotations

import copy
import json
import shutil
import statistics
from pathlib import Path

import torch
import yaml
from cpu_usage import cpu_model

REPO = Path(__file__).resolve().parents[1]


def merge(base: dict, change: dict, replace: tuple[str, ...] = ()) -> dict:
    """``base`` updated by ``change``; nested mappings merge, except keys in ``replace``."""
    merged = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in replace:
            merged[key] = merge(merged[key], value, replace)
        else:
            merged[key] = value
    return merged


def write_run_registry(base: dict, model: dict, task: dict, folder: Path, seed: int, epochs: int) -> Path:
    """A one-task registry in ``folder``, from the repository's registry with overrides."""
    folder.mkdir(parents=True, exist_ok=True)
    for extra in (REPO / "tasks").glob("*_relations.yaml"):
        (folder / extra.name).write_text(extra.read_text())
    (folder / "task.yaml").write_text(yaml.safe_dump(task))
    registry = copy.deepcopy(base)
    registry.update(demo_data=None, tasks=["task.yaml"])
    registry["model"].update(model)
    registry["train"].update(epochs=epochs, seed=seed, log_interval=1000)
    path = folder / "registry.yaml"
    path.write_text(yaml.safe_dump(registry))
    return path


def fresh_run_folder(folder: Path) -> Path:
    """``folder/run``, emptied: a benchmark row always trains anew (waterdrop refuses to mix
    a new run into a folder that holds one)."""
    shutil.rmtree(folder / "run", ignore_errors=True)
    return folder / "run"


def load_base(registry: str | None, task_name: str):
    """The registry to start from (the repository's by default), its parsed config, and the
    ablated task's config and YAML."""
    from waterdrop.config import load_registry

    registry_path = Path(registry) if registry else REPO / "registry.yaml"
    cfg = load_registry(registry_path)
    task_cfg = next(t for t in cfg.tasks if t.name == task_name)
    return registry_path, yaml.safe_load(registry_path.read_text()), cfg, task_cfg, yaml.safe_load(
        task_cfg.file.read_text())


def machine() -> str:
    return (f"{cpu_model()}, {torch.get_num_threads()} threads, "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")


def table(names: list[str], results: dict[str, list[dict]], columns: list[tuple[str, str]]) -> list[str]:
    """Markdown rows: mean (min-max) over seeds for every column, plus minutes per run."""
    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    lines = ["| recipe | " + " | ".join(title for _, title in columns) + " | min / run |",
             "|---|" + "---|" * (len(columns) + 1)]
    for name in names:
        rows = results[name]
        lines.append(f"| {name} | " + " | ".join(cell([r[key] for r in rows]) for key, _ in columns)
                     + f" | {statistics.mean(r['minutes'] for r in rows):.1f} |")
    return lines


def save_report(out: Path, stem: str, lines: list[str], results: dict) -> None:
    """Write ``<stem>.md`` (the table) and ``<stem>.json`` (every run) under ``out`` and print the table."""
    text = "\n".join(lines)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    print(text)


def demo_registry(folder: Path, changes: dict) -> Path:
    """The repository's registry and task files copied into ``folder`` with absolute data
    paths (relative ones would resolve against ``folder``), the registry updated by ``changes``."""
    registry = yaml.safe_load((REPO / "registry.yaml").read_text())
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    for extra in (REPO / "tasks").glob("*_relations.yaml"):
        (folder / "tasks" / extra.name).write_text(extra.read_text())
    for task_file in registry["tasks"]:
        task = yaml.safe_load((REPO / task_file).read_text())
        task["data"] = {k: None if v is None else str(REPO / v) for k, v in task["data"].items()}
        (folder / task_file).write_text(yaml.safe_dump(task, sort_keys=False))
    registry["demo_data"] = str(REPO / registry["demo_data"])
    registry = merge(registry, changes)
    registry["train"]["log_interval"] = 1000
    path = folder / "registry.yaml"
    path.write_text(yaml.safe_dump(registry, sort_keys=False))
    return path


def headline(report: dict) -> dict[str, float]:
    """Per task: the AP (binary), mAP (multi-label) or mean boundary AP (graded) of its report."""
    from waterdrop.kinds import kind_of

    values = {}
    for task, result in report.items():
        summary = kind_of(result["kind"]).summary(result)
        values[task] = next(v for k, v in summary.items() if k != "count")
    return values


def train_and_evaluate(registry: Path, folder: Path) -> dict:
    """Train one registry into ``folder/run`` (always anew), evaluate its best checkpoint (test
    splits where the tasks have them) and return the headline metric per task, the training
    loop's wall time and the run folder."""
    import time

    from waterdrop.config import load_registry
    from waterdrop.engine.checkpoint import best_checkpoint, load_net
    from waterdrop.engine.train import build_runner
    from waterdrop.evaluation.evaluate import evaluate

    runner = build_runner(load_registry(registry), fresh_run_folder(folder), printer=lambda *a, **k: None)
    start = time.perf_counter()
    runner.train()
    seconds = time.perf_counter() - start
    net, cfg, _ = load_net(best_checkpoint(folder / "run"))
    report = evaluate(net, cfg, folder / "run" / "eval")
    return {"metrics": headline(report), "train_seconds": seconds, "run": str(folder / "run"),
            "split": {task: r["split"] for task, r in report.items()}, "machine": machine()}
