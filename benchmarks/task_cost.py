"""Inference cost per task: the default registry's model served by onnxruntime (CPU), fp32 and int8.

    python benchmarks/task_cost.py [--tasks 1 4 10 20] [--repeats 10] [--runs 50] [--calibration-images 32]
        [--wait MINUTES] [--output work_dirs/task_cost.json]

For each N: registry.yaml's model (its backbone, input size, pretrained weights; per-task BatchNorm
in the deepest level) with N untrained BinaryHead tasks, whose BatchNorm statistics are perturbed as
training makes them differ; exported by waterdrop.export.export_onnx, quantized by
waterdrop.quantize.quantize_file (calibrated on uniform random images). A process without torch
then times every file, the files taking turns run by run (onnxruntime CPUExecutionProvider,
intra-op threads = all cores): batch 1 latency (median, p90 of --runs), batch 32 throughput (median
of --repeats), after a warm-up. --wait: first wait for idle cores; a warning when others used them.

Cost = time per image at batch 32; marginal cost of a task = (cost(N) - cost(1)) / ((N - 1) * cost(1)).
Where it goes: the same N tasks with task_bn_stages [] (the deepest level runs once), fp32; the
deepest level's share = (branched(N) - unbranched(N)) / ((N - 1) * branched(1)), the heads' =
(unbranched(N) - unbranched(1)) / ((N - 1) * branched(1)).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT_BATCH = 32
FILES = ("fp32", "int8", "fp32_unbranched")


def build(folder: Path, tasks: int, branched: list[int], calibration: np.ndarray | None,
          blocks: int | None = None) -> dict[str, str]:
    """Export the N-task model (and quantize it when ``calibration`` is given); returns its files."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from multitask_cost import write_binary_tasks

    from waterdrop.config import load_registry
    from waterdrop.export import export_onnx
    from waterdrop.model.multitask import MultiTaskNet
    from waterdrop.model.task_bn import TaskBatchNorm
    from waterdrop.quantize import quantize_file

    model = yaml.safe_load((REPO / "registry.yaml").read_text())["model"]
    names = write_binary_tasks(folder, tasks)
    registry = {"model": {key: model[key] for key in ("backbone", "input_size", "pretrained")}, "tasks": names}
    registry["model"]["task_bn_stages"] = branched
    registry["model"]["task_bn_blocks"] = blocks
    (folder / "registry.yaml").write_text(yaml.safe_dump(registry))
    cfg = load_registry(folder / "registry.yaml")
    torch.manual_seed(tasks)
    net = MultiTaskNet(cfg).eval()
    with torch.no_grad():
        for norm in (n for m in net.modules() if isinstance(m, TaskBatchNorm) for n in m.branches):
            norm.running_mean.add_(torch.randn_like(norm.running_mean) * 0.1)
            norm.running_var.mul_(torch.empty_like(norm.running_var).uniform_(0.5, 2.0))
    files = {"fp32": str(folder / "model.onnx")}
    export_onnx(net, cfg, dict.fromkeys(cfg.task_names, 0.5), files["fp32"])
    if calibration is not None:
        files["int8"] = str(folder / "model.int8.onnx")
        quantize_file(Path(files["fp32"]), Path(files["int8"]), calibration)
    return files


def time_files(paths: dict[str, str], size: int, threads: int, runs: int, repeats: int) -> dict[str, dict]:
    """Batch 1 latency (ms) and batch 32 throughput (images/s) of each ONNX file. The files take
    turns, one run each per round, so that a load that comes and goes touches all of them alike."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {key: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                for key, path in paths.items()}
    rng = np.random.default_rng(0)
    results = {key: {"file_mb": os.path.getsize(path) / 2**20} for key, path in paths.items()}
    for batch, count, warmup in ((1, runs, 10), (THROUGHPUT_BATCH, repeats, 2)):
        images = rng.integers(0, 256, (batch, 3, size, size)).astype(np.float32)
        durations = {key: [] for key in paths}
        for k in range(warmup + count):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"image": images})
                if k >= warmup:
                    durations[key].append(time.perf_counter() - start)
        for key, seconds in durations.items():
            if batch == 1:
                results[key].update(latency_ms=1000 * float(np.median(seconds)),
                                    latency_p90_ms=1000 * float(np.percentile(seconds, 90)))
            else:
                results[key].update(images_per_s=batch / float(np.median(seconds)),
                                    images_per_s_best=batch / min(seconds))
    return results


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used since boot by every process of the machine (/proc/stat, all but idle and
    iowait), and by this one and its ended children."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ours = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK"), sum(u.ru_utime + u.ru_stime for u in ours)


def others_share(before: tuple[float, float], since: float, threads: int) -> float:
    """Share of the cores that other processes used since ``cpu_seconds()`` gave ``before`` at ``since``."""
    machine, ours = cpu_seconds()
    return ((machine - before[0]) - (ours - before[1])) / ((time.perf_counter() - since) * threads)


def wait_until_quiet(limit_s: float, threads: int) -> None:
    """Wait, ``limit_s`` at most, for 10 s in which other processes use under 5% of the cores."""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        before, since = cpu_seconds(), time.perf_counter()
        time.sleep(10)
        if others_share(before, since, threads) < 0.05:
            return


def marginal(cost: float, cost_one: float, tasks: int) -> float | None:
    """Cost of one more task as a fraction of the one-task cost ``cost_one`` (None for one task)."""
    return None if tasks == 1 else (cost - cost_one) / ((tasks - 1) * cost_one)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(results: dict) -> str:
    """The Markdown tables: cost per N, and where the cost of a task goes."""
    rows = results["rows"]
    # Seconds per image at batch 32, per task count and file kind.
    cost = {r["tasks"]: {kind: 1 / r[kind]["images_per_s"] for kind in FILES} for r in rows}
    one = cost[1]
    lines = [f"tf_efficientnet_lite0 {results['input_size']} px, onnxruntime {results['onnxruntime']} CPU, "
             f"{results['threads']} intra-op threads; latency at batch 1 (median / p90 of {results['runs']} runs), "
             f"throughput at batch {THROUGHPUT_BATCH} (median of {results['repeats']} runs).", "",
             "| tasks | fp32 latency ms | fp32 images/s | int8 latency ms | int8 images/s | fp32 MB | int8 MB "
             "| fp32 cost / 1 task | int8 cost / 1 task | fp32 marginal | int8 marginal |", "|---" * 11 + "|"]
    for r in rows:
        n, fp32, int8 = r["tasks"], r["fp32"], r["int8"]
        lines.append(f"| {n} | {fp32['latency_ms']:.1f} / {fp32['latency_p90_ms']:.1f} | {fp32['images_per_s']:.1f} "
                     f"| {int8['latency_ms']:.1f} / {int8['latency_p90_ms']:.1f} | {int8['images_per_s']:.1f} "
                     f"| {fp32['file_mb']:.1f} | {int8['file_mb']:.1f} | {cost[n]['fp32'] / one['fp32']:.2f}x "
                     f"| {cost[n]['int8'] / one['int8']:.2f}x | {fmt(marginal(cost[n]['fp32'], one['fp32'], n))} "
                     f"| {fmt(marginal(cost[n]['int8'], one['int8'], n))} |")
    lines += ["", "Where one more task's cost goes (fp32, batch 32; fractions of the one-task model's time per image; "
              "unbranched = task_bn_stages [], the deepest level runs once):", "",
              "| tasks | unbranched images/s | deepest level | heads | sum |", "|---" * 5 + "|"]
    for r in rows:
        n, c = r["tasks"], cost[r["tasks"]]
        deep = None if n == 1 else (c["fp32"] - c["fp32_unbranched"]) / ((n - 1) * one["fp32"])
        heads = None if n == 1 else (c["fp32_unbranched"] - one["fp32_unbranched"]) / ((n - 1) * one["fp32"])
        total = None if n == 1 else deep + heads
        lines.append(f"| {n} | {r['fp32_unbranched']['images_per_s']:.1f} | {fmt(deep)} | {fmt(heads)} "
                     f"| {fmt(total)} |")
    if "fp32_light" in rows[0]:
        light = {r["tasks"]: {k: 1 / r[f"{k}_light"]["images_per_s"] for k in ("fp32", "int8")} for r in rows}
        lines += ["", "The lighter branching (model.task_bn_blocks), against the same one-task default model:", "",
                  "| tasks | fp32 images/s | int8 images/s | fp32 cost / 1 task | int8 cost / 1 task |",
                  "|---" * 5 + "|"]
        for r in rows:
            n = r["tasks"]
            lines.append(f"| {n} | {r['fp32_light']['images_per_s']:.1f} | {r['int8_light']['images_per_s']:.1f} "
                         f"| {light[n]['fp32'] / one['fp32']:.2f}x | {light[n]['int8'] / one['int8']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 10, 20], help="task counts; 1 is added")
    parser.add_argument("--repeats", type=int, default=10, help=f"timed batch-{THROUGHPUT_BATCH} runs per file")
    parser.add_argument("--runs", type=int, default=50, help="timed batch-1 runs per file")
    parser.add_argument("--calibration-images", type=int, default=32, help="random images for int8 calibration")
    parser.add_argument("--wait", type=float, default=0, help="minutes to wait for idle cores before timing")
    parser.add_argument("--light-blocks", type=int, help="also time the lighter branching (model.task_bn_blocks N), "
                        "fp32 and int8")
    parser.add_argument("--output", type=Path, default=REPO / "work_dirs/task_cost.json")
    parser.add_argument("--time-files", type=Path, help=argparse.SUPPRESS)  # the timing child
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    model = yaml.safe_load((REPO / "registry.yaml").read_text())["model"]
    size = model["input_size"]
    if args.time_files:
        files = json.loads(args.time_files.read_text())
        paths = {f"{n}/{kind}": path for n, kinds in files.items() for kind, path in kinds.items()}
        timed = time_files(paths, size, threads, args.runs, args.repeats)
        print(json.dumps({n: {kind: timed[f"{n}/{kind}"] for kind in kinds} for n, kinds in files.items()}))
        return
    counts = sorted(set(args.tasks) | {1})
    calibration = np.random.default_rng(0).integers(0, 256, (args.calibration_images, 3, size, size)).astype(
        np.float32)
    with tempfile.TemporaryDirectory(prefix="task_cost-") as tmp:
        files = {}
        for n in counts:
            files[n] = build(Path(tmp) / f"tasks{n}", n, [-1], calibration)
            files[n]["fp32_unbranched"] = build(Path(tmp) / f"tasks{n}_unbranched", n, [], None)["fp32"]
            if args.light_blocks:
                light = build(Path(tmp) / f"tasks{n}_light", n, [-1], calibration, args.light_blocks)
                files[n].update(fp32_light=light["fp32"], int8_light=light["int8"])
            print(f"built {n} task(s)", file=sys.stderr, flush=True)
        (Path(tmp) / "files.json").write_text(json.dumps(files))
        wait_until_quiet(args.wait * 60, threads)
        before, since = cpu_seconds(), time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--time-files", str(Path(tmp) / "files.json"), "--runs",
                               str(args.runs), "--repeats", str(args.repeats)], capture_output=True, text=True)
        others = others_share(before, since, threads)
        if done.returncode:
            raise SystemExit(f"timing failed:\n{done.stderr[-3000:]}")
    if others > 0.05:
        print(f"WARNING: other processes used {others:.0%} of the cores during timing; the numbers are disturbed",
              file=sys.stderr)
    import onnxruntime
    import torch

    timings = json.loads(done.stdout.splitlines()[-1])
    results = {"input_size": size, "threads": threads, "machine_cores": os.cpu_count(), "runs": args.runs,
               "repeats": args.repeats, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
               "pretrained": model["pretrained"], "calibration": f"{args.calibration_images} uniform random images",
               "other_processes_cpu_share": others, "rows": [{"tasks": n, **timings[str(n)]} for n in counts]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
