"""Cold start on real photographs: a few seed images, the pool itself, Label Studio, a new task.

    python benchmarks/real_photos.py        # the real-photo suite
    python benchmarks/task_lifecycle.py     # the production models (each lacks one task)
    make label-studio                       # Label Studio in its own venv
    python benchmarks/cold_start.py [--task collage] [--seeds 10] [--budget 200] [--prevalence 0.02]
        [--out work_dirs/cold_start]

The model in production is task_lifecycle.py's model of the two other real-photo tasks
(``<task>/production``): it has never seen the task. The pool is every image of the suite that
is not a positive of the task, but the task's val and test splits (kept unseen for the report),
plus the task's training positives at ``--prevalence`` of the pool (the seeds are other training
positives: a team's examples are not in the pool). Every step runs the command-line tools a
user would run:

1. ``tools/export.py`` the production run, ``tools/scan.py POOL --embeddings``,
   ``tools/search_pool.py build``;
2. ``tools/search_pool.py query`` with ``--seeds`` of the task's training positives: the top
   ``--budget`` candidates;
3. ``tools/label_studio.py export`` of the candidates (their similarity in each task), into a real
   Label Studio server (project, local storage, import); each task is annotated through the API
   with the image's true label (the annotator), exported, and ``tools/label_studio.py import``-ed
   into the task's manifest, the seeds added as positives;
4. the task added to the production model (``--from``, full-rank residual adapters, the best
   added-task row of task_lifecycle.py), val split from the suite, report on its test split.

Rows: ``search`` (the above), ``random`` (``--budget`` pool images drawn at random, labelled
with the truth, plus the seeds) and ``full`` (the task's whole training split). Per row: positives
among the labelled images, test AP, training wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, machine  # noqa: E402

from waterdrop.engine.train import run_training
from waterdrop.labelling.client import local_server
from waterdrop.labelling.label_studio import merge_into_manifest, result_for

PY = sys.executable


def tool(*args, ok=(0,)) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([PY, *map(str, args)], capture_output=True, text=True, cwd=REPO)
    if done.returncode not in ok:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({done.returncode}): {done.stderr[-3000:]}")
    return done, time.perf_counter() - start


def truth(path: str, task: str) -> str:
    """The image's label for the task: positive only in the task's own positive folders."""
    parts = Path(path).parts
    return "positive" if parts[-4] == task and parts[-2] == "positive" else "normal"


def train_row(folder: Path, production: Path, task: str, train: Path, data: Path) -> dict:
    """The task added to the production model, trained on ``train``; its test AP and wall time."""
    record = folder / "row.json"
    if record.is_file():
        return json.loads(record.read_text())
    registry = yaml.safe_load((production.parent / "registry.yaml").read_text())
    for name in registry["tasks"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text((production.parent / name).read_text())
    added = yaml.safe_load((REPO / "work_dirs/task_lifecycle/a_joint" / f"{task}.yaml").read_text())
    added["data"] = {"train": str(train), "val": str(data / task / "val"), "test": str(data / task / "test")}
    added["adapters"] = {"rank": 4096}
    (folder / f"{task}.yaml").write_text(yaml.safe_dump(added))
    registry["tasks"].append(f"{task}.yaml")
    (folder / "registry.yaml").write_text(yaml.safe_dump(registry))
    start = time.perf_counter()
    report = run_training(folder / "registry.yaml", folder / "run", printer=lambda *a, **k: None, parent=production)
    row = {"ap": report[task]["ap"], "train_s": round(time.perf_counter() - start, 1)}
    record.write_text(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="collage")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--prevalence", type=float, default=0.02, help="the task's positives' share of the pool")
    parser.add_argument("--data", type=Path, default=REPO / "work_dirs/real_photos")
    parser.add_argument("--out", type=Path, default=REPO / "work_dirs/cold_start")
    args = parser.parse_args()
    task, data = args.task, args.data.resolve()
    out = args.out / f"{task}_prevalence{args.prevalence:g}"
    out.mkdir(parents=True, exist_ok=True)
    production = REPO / "work_dirs/task_lifecycle" / task / "production/run"
    steps: dict[str, float] = {}
    model = out / "model.onnx"
    if not model.is_file():
        steps["export_s"] = tool("tools/export.py", production, "-o", model)[1]
    candidates_of_pool = sorted(str(p) for p in data.glob("*/*/*/*.jpg")
                                if not (p.parts[-4] == task and p.parts[-3] != "train"))
    negatives = [p for p in candidates_of_pool if truth(p, task) == "normal"]
    rng = np.random.default_rng(0)
    known = rng.permutation([p for p in candidates_of_pool if truth(p, task) == "positive"]).tolist()
    count = round(args.prevalence * len(negatives) / (1 - args.prevalence))
    seeds, positives = sorted(known[: args.seeds]), known[args.seeds: args.seeds + count]
    pool = sorted(negatives + positives)
    (out / "pool.txt").write_text("".join(f"{p}\n" for p in pool))
    steps["scan_s"] = tool("tools/scan.py", model, out / "pool.txt", "--out", out / "scan", "--embeddings",
                           "--quiet")[1]
    steps["index_s"] = tool("tools/search_pool.py", "build", out / "scan", "--index", out / "index", "--quiet")[1]
    query = out / "query"
    if not (query / "candidates.csv").is_file():
        steps["query_s"] = tool("tools/search_pool.py", "query", *seeds, "--index", out / "index", "--model", model,
                                "--top", args.budget, "--out", query)[1]
    with open(query / "candidates.csv", newline="") as stream:
        candidates = [row["path"] for row in csv.DictReader(stream)]
    registry = production.parent / "registry.yaml"
    labelled_registry = out / "task_registry"
    labelled_registry.mkdir(exist_ok=True)
    # tools/label_studio.py reads the task's labels from a registry that lists it.
    (labelled_registry / f"{task}.yaml").write_text((REPO / "work_dirs/task_lifecycle/a_joint" / f"{task}.yaml")
                                                    .read_text())
    (labelled_registry / "registry.yaml").write_text(yaml.safe_dump({**yaml.safe_load(registry.read_text()),
                                                                     "tasks": [f"{task}.yaml"]}))
    manifest = out / f"{task}_round1.jsonl"
    if not manifest.is_file():
        tool("tools/label_studio.py", "export", query / "candidates.csv", "--registry",
             labelled_registry / "registry.yaml", "--task", task, "--image-root", data.parent,
             "--out", out / "label_studio", "--overwrite")
        tasks = json.loads((out / "label_studio" / "tasks.json").read_text())
        description = {"name": task, "kind": "binary", "labels": ["positive"], "negative_label": "normal"}
        start = time.perf_counter()
        # Label Studio serves a storage folder strictly inside its document root.
        with local_server(REPO / ".venv-labelstudio", out / "ls_data", document_root=data.parent) as server:
            steps["label_studio_start_s"] = time.perf_counter() - start
            project = server.create_project(f"{task} round 1",
                                            (out / "label_studio" / "label_config.xml").read_text())
            server.add_local_storage(project, data)
            server.import_tasks(project, tasks)
            for item in server.tasks(project):
                server.annotate(item["id"], result_for(description, [truth(item["data"]["waterdrop_image"], task)]))
            (out / "export.json").write_text(json.dumps(server.export(project)))
        steps["label_studio_s"] = time.perf_counter() - start
        tool("tools/label_studio.py", "import", out / "export.json", "--registry", labelled_registry / "registry.yaml",
             "--task", task, "--manifest", manifest)
        merge_into_manifest(manifest, {seed: ["positive"] for seed in seeds})
    random_manifest = out / f"{task}_random.jsonl"
    if not random_manifest.is_file():
        drawn = rng.choice([p for p in pool if p not in seeds], args.budget, replace=False).tolist()
        merge_into_manifest(random_manifest, {**{p: [truth(p, task)] for p in drawn},
                                              **{seed: ["positive"] for seed in seeds}})
    rows = {}
    for name, train in (("search", manifest), ("random", random_manifest), ("full", data / task / "train")):
        if train.suffix == ".jsonl":
            labels = [json.loads(line)["labels"][0] for line in train.read_text().splitlines()]
            found = {"labelled": len(labels), "positives": labels.count("positive")}
        else:
            found = {"labelled": sum(1 for _ in train.glob("*/*.jpg")),
                     "positives": sum(1 for _ in (train / "positive").glob("*.jpg"))}
        folder = args.out / f"{task}_train_full" if name == "full" else out / f"train_{name}"  # full: one per task
        rows[name] = {**found, **train_row(folder, production, task, train, data)}
        print(name, rows[name], flush=True)
    in_top = sum(truth(p, task) == "positive" for p in candidates)
    result = {"machine": machine(), "task": task, "seeds": args.seeds, "budget": args.budget, "pool": len(pool),
              "prevalence": args.prevalence,
              "pool_positives": len(positives), "candidates_positive": in_top, "steps_s": steps, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
