"""A task joins a trained model: against joint retraining and training it alone, on real photographs.

    python benchmarks/real_photos.py                # builds work_dirs/real_photos once
    python benchmarks/task_lifecycle.py [--data work_dirs/real_photos] [--added collage ...]
        [--rank 8] [--out work_dirs/task_lifecycle]

For every task X of the real-photo suite (each in turn the added one), a model is first trained
jointly on the two others from the packaged ImageNet weights (the model in production), then:

* ``a_joint``: all three tasks retrained jointly from ImageNet weights (one run, shared by every X);
* ``b_bn_head``: ``tools/train.py --from`` that model, X added with its BatchNorm copies and head only;
* ``c_adapters``: the same with residual adapters (task YAML ``adapters: {rank: R}``), and with
  ``--extra-ranks`` further rows of other ranks (one above a convolution's size is full rank:
  the task's own copy of every convolution of the branched level, still folded at export);
* ``d_alone``: X fine-tuned alone from ImageNet weights (one run per X).

Per row: X's test AP, every old task's test AP, the largest change of every old task's outputs
from the production model's on the test images of all three tasks (PyTorch, and for rows b and
c onnxruntime on both exported files), and the wall time of the whole run (training, validation,
final evaluation). The recipe is the repository's ``registry.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, machine  # noqa: E402
from transfer import TASKS, task_yaml  # noqa: E402

from waterdrop.data.loaders import eval_loader
from waterdrop.engine.checkpoint import best_checkpoint, load_net
from waterdrop.engine.train import run_training
from waterdrop.export import export_onnx


def write_registry(folder: Path, tasks: list[dict], model: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    registry = yaml.safe_load((REPO / "registry.yaml").read_text())
    registry.update(demo_data=None, tasks=[])
    registry["model"].update(model or {})
    registry["train"]["log_interval"] = 1000
    for task in tasks:
        (folder / f"{task['name']}.yaml").write_text(yaml.safe_dump(task))
        registry["tasks"].append(f"{task['name']}.yaml")
    (folder / "registry.yaml").write_text(yaml.safe_dump(registry))
    return folder / "registry.yaml"


def train(folder: Path, tasks: list[dict], model: dict | None = None, **plan) -> dict:
    """One run (skipped when its folder already holds a finished one); its report and wall time."""
    record = folder / "row.json"
    if record.is_file():
        return json.loads(record.read_text())
    registry = write_registry(folder, tasks, model)
    start = time.perf_counter()
    report = run_training(registry, folder / "run", printer=lambda *a, **k: None, **plan)
    row = {"seconds": time.perf_counter() - start, "ap": {name: r["ap"] for name, r in report.items()}}
    record.write_text(json.dumps(row, indent=2))
    return row


@torch.no_grad()
def output_changes(before_run: Path, after_run: Path, old: list[str], onnx_folder: Path | None) -> dict:
    """Largest absolute change of the old tasks' outputs between two runs on every test image
    of the later run's tasks, in PyTorch and (with ``onnx_folder``) between the exported files."""
    before, _, _ = load_net(best_checkpoint(before_run))
    after, cfg, meta = load_net(best_checkpoint(after_run))
    images = torch.cat([batch["inputs"] for batch in eval_loader(cfg, after, "test")])
    changes = {"images": len(images)}
    torch_worst = dict.fromkeys(old, 0.0)
    for chunk in images.split(64):
        a, b = before.eval().forward_all(chunk), after.eval().forward_all(chunk)
        for name in old:
            keys = [k for k in a if k.startswith(f"{name}.")]
            torch_worst[name] = max(torch_worst[name], *(float((a[k].double() - b[k].double()).abs().max())
                                                         for k in keys))
    changes["torch"] = torch_worst
    if onnx_folder is not None:
        import onnxruntime as ort

        results = []
        for label, run in (("before", before_run), ("after", after_run)):
            net, run_cfg, run_meta = load_net(best_checkpoint(run))
            thresholds = json.loads((run / "eval" / "thresholds.json").read_text())
            path = onnx_folder / f"{label}.onnx"
            export_onnx(net, run_cfg, thresholds, path, lineage=run_meta.get("lineage"))
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            outputs = [session.run(names, {"image": chunk.float().numpy()}) for chunk in images.split(64)]
            results.append({n: np.concatenate([o[i] for o in outputs]) for i, n in enumerate(names)})
        changes["onnx"] = {name: max(float(np.abs(results[0][k].astype(np.float64) - results[1][k]).max())
                                     for k in results[0] if k.startswith(f"{name}."))
                           for name in old}
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "work_dirs" / "real_photos"))
    parser.add_argument("--added", nargs="+", default=list(TASKS), help="tasks to add in turn")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank of row c")
    parser.add_argument("--extra-ranks", type=int, nargs="*", default=[],
                        help="further adapter rows c_adapters_r<R> (a rank above a convolution's size is full rank)")
    parser.add_argument("--extra-tasks", nargs="*", help="added tasks that get the --extra-ranks rows (default: all)")
    parser.add_argument("--light-blocks", type=int, nargs="*", default=[],
                        help="also train all three jointly with model.task_bn_blocks N (the lighter branching)")
    parser.add_argument("--out", default=str(REPO / "work_dirs" / "task_lifecycle"))
    args = parser.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out)
    if not (data / "manifest.json").is_file():
        sys.exit(f"{data}: no real-photo data; run benchmarks/real_photos.py first")
    yamls = {name: task_yaml(name, data) for name in TASKS}
    results = {"machine": machine(), "rank": args.rank, "rows": {}}
    joint = train(out / "a_joint", [yamls[name] for name in TASKS])
    for blocks in args.light_blocks:  # the lighter branching option, trained jointly
        light = train(out / f"a_joint_blocks{blocks}", [yamls[name] for name in TASKS], {"task_bn_blocks": blocks})
        results[f"a_joint_blocks{blocks}"] = light
        print(f"joint, model.task_bn_blocks {blocks}: AP {light['ap']}  seconds {light['seconds']:.0f} "
              f"(whole level: AP {joint['ap']})", flush=True)
    for added in args.added:
        old = [name for name in TASKS if name != added]
        base_folder = out / added / "production"
        production = train(base_folder, [yamls[name] for name in old])
        with_adapters = {**yamls[added], "adapters": {"rank": args.rank}}
        rows = {
            "a_joint": (joint, out / "a_joint"),
            "b_bn_head": (train(out / added / "b_bn_head", [yamls[n] for n in TASKS], parent=base_folder / "run"),
                          out / added / "b_bn_head"),
            "c_adapters": (train(out / added / "c_adapters", [yamls[n] if n != added else with_adapters for n in TASKS],
                                 parent=base_folder / "run"), out / added / "c_adapters"),
            "d_alone": (train(out / "alone" / added, [yamls[added]]), out / "alone" / added),
        }
        for rank in args.extra_ranks if added in (args.extra_tasks or TASKS) else []:
            row, ranked = f"c_adapters_r{rank}", {**yamls[added], "adapters": {"rank": rank}}
            rows[row] = (train(out / added / row, [yamls[n] if n != added else ranked for n in TASKS],
                               parent=base_folder / "run"), out / added / row)
        results["rows"][added] = {"production": production}
        for row, (result, folder) in rows.items():
            entry = {"added_ap": result["ap"][added], "old_ap": {n: result["ap"].get(n) for n in old},
                     "seconds": result["seconds"]}
            if row != "d_alone":
                onnx_folder = folder / "onnx" if row.startswith(("b_", "c_")) else None
                if onnx_folder is not None:
                    onnx_folder.mkdir(parents=True, exist_ok=True)
                entry["old_output_change"] = output_changes(base_folder / "run", folder / "run", old, onnx_folder)
            results["rows"][added][row] = entry
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))
            print(f"{added} {row}: added AP {entry['added_ap']:.4f}  seconds {entry['seconds']:.0f}  "
                  f"old change {entry.get('old_output_change', {}).get('torch')}", flush=True)
    print("\n| added | row | added task test AP | old tasks' test AP | old outputs' largest change (torch / ONNX) "
          "| wall s |")
    print("|---|---|---|---|---|---|")
    for added, rows in results["rows"].items():
        production = rows["production"]
        olds = " / ".join(f"{n} {ap:.4f}" for n, ap in production["ap"].items())
        print(f"| {added} | production (2 tasks) | - | {olds} | - | {production['seconds']:.0f} |")
        for row, entry in rows.items():
            if row == "production":
                continue
            olds = " / ".join(f"{n} {ap:.4f}" for n, ap in entry["old_ap"].items() if ap is not None) or "-"
            change = entry.get("old_output_change", {})
            moved = "-" if not change else " / ".join(
                f"{max(change[k].values()):.2g}" for k in ("torch", "onnx") if k in change)
            print(f"| {added} | {row} | {entry['added_ap']:.4f} | {olds} | {moved} | {entry['seconds']:.0f} |")


if __name__ == "__main__":
    main()
