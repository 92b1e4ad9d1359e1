"""Shared pieces of the ablation benchmarks: cumulative config rows, run registries, tables."""

from __future__ import annotations

import copy
import json
import platform
import shutil
import statistics
from pathlib import Path

import torch
import yaml

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
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
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
