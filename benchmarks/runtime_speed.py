"""Serving speed: torch eager against onnxruntime fp32 and int8, and what int8 costs in AP.

    python benchmarks/runtime_speed.py [--seconds 20] [--warmup 5] [--threads 2] [--models demo resnet50]
        [--calibration-images 256] [--eval-images N] [--out work_dirs/runtime_speed]

Models: ``demo``, the run ``make demo`` trains (work_dirs/demo: tf_efficientnet_lite0 at 192 px,
three tasks, per-task BatchNorm in the last level); ``resnet50``, the same registry on an
UNTRAINED resnet50 at 224 px (per-task BatchNorm statistics drawn at random, as training makes
them differ, else the exporter merges the tasks' equal branches): its speed is a trained
model's; its AP means nothing and is not reported.

For each model: the ONNX file as tools/export.py writes it (each task through its own
BatchNorms, which onnxruntime folds into the convolutions), that file quantized by
waterdrop.quantize (static QDQ per-channel, calibrated on the tasks' training images), and for
comparison both built from the stacked-batch graph the export wrote before (BatchNorms left
unfolded). Each setting is timed in its own process (torch and onnxruntime never share one)
on random images with ``--threads`` threads at batch 1 and 16: ``--warmup`` seconds of runs,
then as many runs as fit in ``--seconds``. AP per task, fp32 against int8, is the quantization gate's own
measurement on the demo tasks' test splits (registry.yaml, demo_data/; ``--eval-images`` takes
a random subset, for a quick check). Writes OUT/report.md and OUT/results.json. The issue's
aims: ORT fp32 >= 1.8x torch eager; int8 >= 2x ORT fp32 with an AP drop <= 0.005.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan_speed import machine  # noqa: E402

ENGINES = {"torch": "torch eager", "fp32": "ORT fp32", "int8": "ORT int8",
           "fp32_stacked": "ORT fp32, stacked graph", "int8_stacked": "ORT int8, stacked graph"}
BATCHES = (1, 16)


def time_runs(run, batch: np.ndarray, seconds: float, warmup: float) -> dict:
    """Images/s of ``run(batch)``: a warm-up of 5 runs and ``warmup`` seconds at least (torch's
    first three runs of the demo model took 4 s each, against 0.1 s after), then runs until
    ``seconds`` have passed (3 at least)."""
    runs, start = 0, time.perf_counter()
    while runs < 5 or time.perf_counter() - start < warmup:
        run(batch)
        runs += 1
    durations, start = [], time.perf_counter()
    while len(durations) < 3 or time.perf_counter() - start < seconds:
        begin = time.perf_counter()
        run(batch)
        durations.append(time.perf_counter() - begin)
    return {"runs": len(durations), "images_per_s": len(durations) * len(batch) / sum(durations),
            "median_ms": 1000 * float(np.median(durations))}


def measure(files: dict, engine: str, batch_size: int, threads: int, seconds: float, warmup: float) -> dict:
    """One setting, in this (child) process: torch is imported only for torch eager."""
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, 3, files["size"], files["size"])).astype(np.float32)
    if engine == "torch":
        import torch

        from waterdrop.config import config_from_dict
        from waterdrop.model.multitask import MultiTaskNet

        torch.set_num_threads(threads)
        saved = torch.load(files["torch"], weights_only=True)
        net = MultiTaskNet(config_from_dict(saved["config"])).eval()
        net.load_state_dict(saved["state"])

        def run(images):
            with torch.inference_mode():
                return net.forward_all(torch.from_numpy(images))
    else:
        from waterdrop.runtime import Predictor

        predictor = Predictor(files[engine], threads=threads)

        def run(images):
            return predictor.session.run(predictor.output_names, {"image": images})
    return time_runs(run, batch, seconds, warmup)


def batchnorm_nodes(path: Path) -> int:
    """BatchNormalization nodes left in onnxruntime's optimised graph (extended level: the NCHWc
    layout pass would turn an unfolded BatchNorm into a 1x1 convolution and hide it)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(options.optimized_model_filepath).graph.node
    Path(options.optimized_model_filepath).unlink()
    return collections.Counter(node.op_type for node in nodes)["BatchNormalization"]


def build(name: str, folder: Path, calibration_count: int, eval_images: int | None) -> tuple[dict, dict | None]:
    """Export, quantize and save the PyTorch weights of one model; returns its files and, for the
    demo, the quantization record (AP per task, fp32 and int8)."""
    import torch

    from waterdrop.config import config_to_dict, load_registry
    from waterdrop.engine.checkpoint import best_checkpoint, load_net, recorded_thresholds
    from waterdrop.export import export_onnx
    from waterdrop.model.multitask import MultiTaskNet
    from waterdrop.model.task_bn import TaskBatchNorm
    from waterdrop.quantize import quantize, quantize_file
    from waterdrop.runtime import Predictor
    from waterdrop.scoring import calibration_images, task_data_from_config

    folder.mkdir(parents=True, exist_ok=True)
    if name == "demo":
        checkpoint = best_checkpoint(REPO / "work_dirs/demo")
        net, cfg, meta = load_net(checkpoint)
        thresholds = recorded_thresholds(checkpoint, meta)[0]
    else:
        cfg = load_registry(REPO / "registry.yaml")
        cfg.model.backbone, cfg.model.pretrained, cfg.model.input_size = "resnet50", None, 224
        cfg.model.mean, cfg.model.std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        torch.manual_seed(0)
        net = MultiTaskNet(cfg).eval()
        with torch.no_grad():
            for norm in (n for m in net.modules() if isinstance(m, TaskBatchNorm) for n in m.branches):
                norm.running_mean.normal_(0, 0.1)
                norm.running_var.uniform_(0.5, 2.0)
        thresholds = {t.name: dict.fromkeys(t.labels, 0.5) if t.head_type == "MultiLabelHead" else 0.5
                      for t in cfg.tasks}
    files = {"size": cfg.model.input_size, "torch": str(folder / "torch.pth")}
    cfg.model.pretrained = None  # the weights come from the saved state; nothing to load twice
    torch.save({"config": config_to_dict(cfg), "state": net.state_dict()}, files["torch"])
    forward_all = type(net).forward_all
    for suffix in ("", "_stacked"):
        files[f"fp32{suffix}"] = str(folder / f"model{suffix}.onnx")
        if suffix:  # the export before issue 12: the stacked batch, no convolution copies
            with mock.patch.object(type(net), "forward_all", lambda self, images, stack_tasks=True, cams=False:
                                   forward_all(self, images, True, cams)), \
                    mock.patch("waterdrop.export._unshare_convolutions", lambda model: 0):
                export_onnx(net, cfg, thresholds, files["fp32_stacked"])
        else:
            export_onnx(net, cfg, thresholds, files["fp32"])
    calibration = [task.train for task in cfg.tasks]
    record = None
    if name == "demo":
        tasks = task_data_from_config(load_registry(REPO / "registry.yaml"), Predictor(files["fp32"]).tasks)
        for data in tasks.values():
            data.gate, data.val = (subset(p, eval_images, folder) if eval_images else p for p in (data.gate, data.val))
        files["int8"] = str(folder / "model.int8.onnx")
        record = quantize(files["fp32"], files["int8"], calibration, tasks, force=True,
                          calibration_count=calibration_count)
    images, _ = calibration_images(calibration, calibration_count, cfg.model.input_size)
    for suffix in ("_stacked",) if name == "demo" else ("", "_stacked"):
        files[f"int8{suffix}"] = str(folder / f"model{suffix}.int8.onnx")
        quantize_file(Path(files[f"fp32{suffix}"]), Path(files[f"int8{suffix}"]), images)
    files["batchnorm_nodes"] = {engine: batchnorm_nodes(Path(files[engine])) for engine in ENGINES if engine != "torch"}
    return files, record


def subset(manifest: Path, count: int, folder: Path) -> Path:
    """A seeded random ``count`` lines of a JSONL manifest, written beside the model (paths made absolute)."""
    lines = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    chosen = np.random.default_rng(0).permutation(len(lines))[:count]
    target = folder / f"{manifest.parent.name}_{manifest.stem}_{count}.jsonl"
    target.write_text("".join(json.dumps(dict(lines[i], image=str(manifest.parent / lines[i]["image"]))) + "\n"
                              for i in sorted(chosen)))
    return target


def report(host: str, args: argparse.Namespace, models: dict, speeds: dict, record: dict | None) -> str:
    lines = ["# Runtime speed: torch eager, onnxruntime fp32 and int8", "",
             f"Machine: {host}. {args.threads} threads, random images, each setting in its own process, "
             f"about {args.seconds:g} s of runs after a warm-up. demo = work_dirs/demo (tf_efficientnet_lite0, 192 px, "
             "trained by `make demo`); resnet50 = the same registry on an untrained resnet50 at 224 px (speed only). "
             "\"stacked graph\": the export before issue 12 (per-task BatchNorm on the stacked batch, not folded).", "",
             "| model | batch | " + " | ".join(ENGINES.values()) + " | fp32 / torch | int8 / fp32 |",
             "|---|---|" + "---|" * (len(ENGINES) + 2)]
    for name in models:
        for batch in BATCHES:
            rate = {engine: speeds[name][engine][str(batch)]["images_per_s"] for engine in ENGINES}
            lines.append(f"| {name} | {batch} | " + " | ".join(f"{rate[e]:.1f}" for e in ENGINES)
                         + f" | {rate['fp32'] / rate['torch']:.2f}x | {rate['int8'] / rate['fp32']:.2f}x |")
    lines += ["", "Images/s. BatchNormalization nodes left after onnxruntime's optimisation: "
              + "; ".join(f"{name}: " + ", ".join(f"{ENGINES[e]} {n}" for e, n in files["batchnorm_nodes"].items())
                          for name, files in models.items()) + "."]
    if record:
        lines += ["", f"AP of the demo tasks, fp32 against int8 (calibrated on {record['calibration']['images']} "
                  "training images; the gate's budget is a drop of 0.005):", "",
                  "| task | metric | split | images | fp32 | int8 | drop | within 0.005 |", "|---" * 8 + "|"]
        for task, r in record["tasks"].items():
            values = " | ".join("n/a" if r[k] is None else f"{r[k]:.4f}" for k in ("fp32", "int8", "drop"))
            within = "n/a" if r["drop"] is None else "yes" if r["drop"] <= 0.005 else "NO"
            lines.append(f"| {task} | {r['metric']} | {r['split']} | {r['images']} | {values} | {within} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="timed runs per setting, after warm-up")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up per setting, seconds (5 runs at least)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["demo", "resnet50"], choices=["demo", "resnet50"])
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--eval-images", type=int, help="a random subset of each test/val split (quick checks)")
    parser.add_argument("--out", type=Path, default=REPO / "work_dirs/runtime_speed")
    parser.add_argument("--measure", nargs=3, metavar=("MODEL", "ENGINE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # a child: one setting
        name, engine, batch = args.measure
        files = json.loads((args.out / "models.json").read_text())[name]
        print(json.dumps(measure(files, engine, int(batch), args.threads, args.seconds, args.warmup)))
        return
    if "demo" in args.models and not (REPO / "work_dirs/demo").is_dir():
        raise SystemExit("work_dirs/demo is missing: `make demo` trains it (or leave it out with --models resnet50)")
    host = machine()  # before this benchmark loads the machine
    if os.getloadavg()[0] > 0.5:
        print(f"WARNING: load average {os.getloadavg()[0]:.1f}: other processes share the cores, so these timings are "
              "wrong (torch's most: its OpenMP threads wait for descheduled peers)", file=sys.stderr)
    models, record = {}, None
    for name in args.models:
        models[name], found = build(name, args.out / name, args.calibration_images, args.eval_images)
        record = record or found
    (args.out / "models.json").write_text(json.dumps(models, indent=2))
    speeds = collections.defaultdict(lambda: collections.defaultdict(dict))
    for name in models:
        for engine in ENGINES:
            for batch in BATCHES:
                done = subprocess.run([sys.executable, __file__, "--measure", name, engine, str(batch), "--out",
                                       str(args.out), "--threads", str(args.threads), "--seconds", str(args.seconds),
                                       "--warmup", str(args.warmup)],
                                      capture_output=True, text=True, cwd=REPO)
                if done.returncode:
                    raise SystemExit(f"{name} {engine} batch {batch} failed:\n{done.stderr[-3000:]}")
                speeds[name][engine][str(batch)] = json.loads(done.stdout.splitlines()[-1])
                print(f"{name} {ENGINES[engine]} batch {batch}: {speeds[name][engine][str(batch)]['images_per_s']:.1f} "
                      "images/s", flush=True)
    text = report(host, args, models, speeds, record)
    print(text)
    (args.out / "report.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"machine": host, "args": vars(args) | {"out": str(args.out)},
                                                       "models": models, "speeds": speeds, "quantization": record},
                                                      indent=2) + "\n")


if __name__ == "__main__":
    main()
