"""Does int8 pass its own gate? Calibration methods, and mixed precision, on trained runs.

    python benchmarks/int8_gate.py --runs work_dirs/int8/e1 work_dirs/int8/e3 \
        [--methods minmax percentile entropy] [--search-method minmax] [--out work_dirs/int8_gate]

Each run folder holds a trained registry and its export (``model.onnx``; e.g. ``tools/train.py
registry.yaml --epochs 1 --work-dir R`` then ``tools/export.py R -o R/model.onnx``). For each
run: (1) every calibration method, all-int8 (``max_fp32=0``): each task's drop on its test
split; (2) ``--search-method`` with the mixed-precision search (the tool's default): the drops,
the activations kept in fp32, the counts tried; (3) the speed of fp32 and of each int8 file
written, measured here in turns (``--seconds`` each, 2 threads, batch 16, calibration images).
Calibration: 256 images drawn in turn from every task's training manifest, as the README
says. Writes OUT/report.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cpu_usage import cpu_model  # noqa: E402

from waterdrop.mixed_precision import ORDERS  # noqa: E402
from waterdrop.quantize import CALIBRATION_METHODS, DEFAULT_MAX_DROP, images_per_second, quantize  # noqa: E402
from waterdrop.runtime import Predictor  # noqa: E402
from waterdrop.scoring import calibration_images, load_config, task_data_from_config  # noqa: E402


def machine() -> str:
    return f"{os.cpu_count()}-core {cpu_model()}, CPU only"


def speed(files: dict[str, Path], images: np.ndarray, seconds: float, rounds: int = 3) -> dict[str, float]:
    """Images/s of each file, in turns (``rounds`` turns of ``seconds`` / ``rounds``): drift of
    the machine falls on every file alike. Best turn of each."""
    predictors = {name: Predictor(path, threads=2) for name, path in files.items()}
    best = dict.fromkeys(files, 0.0)
    for _ in range(rounds):
        for name, predictor in predictors.items():
            best[name] = max(best[name], images_per_second(predictor, images, 16, seconds / rounds))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=list(CALIBRATION_METHODS), choices=list(CALIBRATION_METHODS))
    parser.add_argument("--search-method", default="minmax", choices=list(CALIBRATION_METHODS))
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=list(ORDERS),
                        help="orders of the mixed-precision search (mixed_precision.rank_activations)")
    parser.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP, help="the gate's budget")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=9.0, help="timed seconds per file")
    parser.add_argument("--out", type=Path, default=REPO / "work_dirs/int8_gate")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    host = machine()
    results = {}
    for run in args.runs:
        model = run / "model.onnx"
        cfg = load_config(run)
        tasks = task_data_from_config(cfg, Predictor(model).tasks)
        calibration = [task.train for task in cfg.tasks]
        found: dict[str, dict] = {}
        failed: list[str] = []
        files = {"fp32": model}
        for method in args.methods:
            target = args.out / run.name / f"{method}.int8.onnx"
            try:
                found[f"{method}, all int8"] = quantize(model, target, calibration, tasks, method=method, max_fp32=0,
                                                        max_drop=args.max_drop,
                                                        calibration_count=args.calibration_images, force=True)
            except ValueError as err:  # a calibration method onnxruntime cannot run on this model
                failed.append(f"{method}: {err}")
                continue
            files[f"{method}, all int8"] = target
        for order in args.orders:
            target = args.out / run.name / f"{args.search_method}.mixed-{order}.int8.onnx"
            started = time.perf_counter()
            label = f"{args.search_method}, mixed precision ({order})"
            try:
                found[label] = quantize(model, target, calibration, tasks, calibration_count=args.calibration_images,
                                        method=args.search_method, force=True, order=order, max_drop=args.max_drop)
            except ValueError as err:
                failed.append(f"{label}: {err}")
                continue
            found[label]["seconds"] = time.perf_counter() - started
            files[label] = target
        images, _ = calibration_images(calibration, 64, Predictor(model).size)
        measured = speed(files, images, args.seconds)
        results[run.name] = {"records": found, "images_per_s": measured, "run": str(run), "failed": failed}
    lines = ["# int8 against its gate", "", f"Machine: {host}. Budget: a drop of {args.max_drop} per task "
             f"(test split). Calibration: {args.calibration_images} training images drawn in turn from every task. "
             "Speed: 2 threads, batch 16, best of 3 turns.", ""]
    for name, result in results.items():
        records = result["records"]
        if not records:
            lines += [f"## {name}", "", *[f"- {failure}" for failure in result["failed"]], ""]
            continue
        task_names = list(next(iter(records.values()))["tasks"])
        lines += [f"## {name} ({result['run']})", "",
                  "| file | " + " | ".join(f"{t} fp32 -> int8 (drop)" for t in task_names)
                  + " | gate | fp32 activations | images/s | x fp32 |",
                  "|---|" + "---|" * (len(task_names) + 4)]
        fp32_speed = result["images_per_s"]["fp32"]
        lines.append("| fp32 | " + " | ".join("-" for _ in task_names) + f" | - | - | {fp32_speed:.0f} | 1.00x |")
        for label, record in records.items():
            cells = [f"{record['tasks'][t]['fp32']:.4f} -> {record['tasks'][t]['int8']:.4f} "
                     f"({record['tasks'][t]['drop']:+.4f})" for t in task_names]
            kept = len(record["mixed_precision"]["kept_fp32"])
            gate = "passed" if not record["failures"] else "refused"
            rate = result["images_per_s"][label]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {gate} | {kept} | {rate:.0f} | "
                         f"{rate / fp32_speed:.2f}x |")
        lines += [f"- {failure}" for failure in result["failed"]]
        for label, record in records.items():
            mixed = record["mixed_precision"]
            if mixed.get("tried"):
                over = ", ".join(mixed["all_int8_over_budget"]["val"])
                lines += ["", f"{label}: all-int8 over the budget on val for {over}; "
                          f"counts tried {[step['fp32_activations'] for step in mixed['tried']]}; "
                          f"{mixed.get('result')}; "
                          f"kept in fp32: {', '.join(mixed['kept_fp32']) or '-'} "
                          f"({100 * mixed.get('fp32_mac_share', 0):.1f} % of the convolution MACs in fp32); "
                          f"quantize with search and gate took {record['seconds']:.0f} s."]
        lines.append("")
    report = "\n".join(lines)
    print(report)
    (args.out / "report.md").write_text(report)
    (args.out / "results.json").write_text(json.dumps({"machine": host, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
