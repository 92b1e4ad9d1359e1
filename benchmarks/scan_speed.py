"""Pool-scan throughput against the combined limit of decoding and onnxruntime on shared cores.

    python benchmarks/scan_speed.py [--images 5000] [--model work_dirs/demo/model.onnx] [--side 640]
        [--batch-size 32] [--workers N] [--threads N] [--with-predict] [--with-ray-tasks] [--out work_dirs/scan_speed]

Builds (once) a pool of ``--images`` JPEGs re-encoded from the real photographs of
``benchmarks/real_photos.py`` (``work_dirs/real_photos/*/*/*/*.jpg``; the demo data when
they are missing) at ``--side`` px on the longer side, then measures, each setting in its
own process so that none distorts another:

(a) the decode limit: read + decode + resize alone (JPEGs at the DCT scale that keeps the
    model's size, as the scanner decodes), ``--workers`` processes;
(b) the ORT limit: ``session.run`` alone on a ready batch, ``--threads`` threads;
(c) ``tools/predict.py`` on the pool folder (one process, decoding and inference in turn;
    only with ``--with-predict``);
(d) ``tools/scan.py --engine local`` (``--workers`` decoders, ``--threads`` ORT threads);
(e) ``tools/scan.py --engine ray`` (one single-thread actor per CPU, decoding inside);
(f) the Ray engine with decoding in a stage of Ray tasks before the actors (``--ray-decode
    tasks``, one single-thread actor per CPU reserving half a CPU, which leaves CPUs to one
    decoding task per two actors on the same cores; only with ``--with-ray-tasks``, 2 CPUs or more).

Decoding and inference need the same CPUs, so the limit of a scan on these cores is not the
smaller of (a) and (b) but 1 / (1/a + 1/b): each image costs the CPU time of both. Aims: the
local engine at >= 85 % of that combined limit, the Ray engine at >= 80 % of the local engine.
Writes OUT/report.md (a markdown table naming the machine) and OUT/results.json. The model
defaults to the demo run's export; ``make demo`` writes it (or pass any exported model).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from cpu_usage import cpu_model, run_measured  # noqa: E402

from waterdrop.scan.local import available_cpus  # noqa: E402


def machine() -> str:
    cores = available_cpus()
    load = f", load average {os.getloadavg()[0]:.2f} at start" if hasattr(os, "getloadavg") else ""
    return f"{cores}-core {cpu_model()}, CPU only{load}"


def _write_pool_image(job: tuple[str, int, int, Path]) -> None:
    source, k, side, target = job
    image = cv2.imread(source, cv2.IMREAD_COLOR)
    if k % 2:
        image = image[:, ::-1]  # a second pass over the photos: other pixels, same statistics
    scale = side / max(image.shape[:2])
    image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                       interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, 90])


def build_pool(folder: Path, count: int, side: int) -> list[Path]:
    """``count`` JPEGs at ``side`` px (longer side); photos are reused flipped when there are fewer."""
    from multiprocessing import Pool

    marker = folder / "pool.json"
    if marker.exists() and json.loads(marker.read_text()) == {"count": count, "side": side}:
        return sorted(folder.glob("*.jpg"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sources = sorted(glob.glob(str(REPO / "work_dirs/real_photos/*/*/*/*.jpg")))
    sources = sources or sorted(glob.glob(str(REPO / "demo_data/*/*/*.jpg")))
    if not sources:
        raise SystemExit("no photographs: run benchmarks/real_photos.py or make demo first")
    jobs = [(sources[k % len(sources)], k // len(sources), side, folder / f"{k:06d}.jpg") for k in range(count)]
    with Pool(available_cpus()) as pool:
        pool.map(_write_pool_image, jobs, chunksize=64)
    marker.write_text(json.dumps({"count": count, "side": side}))
    return sorted(folder.glob("*.jpg"))


def measure_decode(pool: Path, size: int, workers: int, batch: int) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from waterdrop.scan.local import _decode_batch, _start_worker

    paths = [(str(p), None) for p in sorted(pool.glob("*.jpg"))]
    chunks = [paths[k : k + batch] for k in range(0, len(paths), batch)]
    context = multiprocessing.get_context("spawn")  # as the local engine starts its decoders
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker) as executor:
        list(executor.map(_decode_batch, chunks[:workers], [size] * workers))  # start the processes
        start = time.perf_counter()
        decoded = sum(len(done) for done in executor.map(_decode_batch, chunks, [size] * len(chunks)))
        seconds = time.perf_counter() - start
    return {"images": decoded, "seconds": seconds, "images_per_s": decoded / seconds}


def measure_ort(model: Path, threads: int, batch: int, images: int) -> dict:
    from waterdrop.runtime import Predictor

    predictor = Predictor(model, threads=threads)
    tensor = np.random.default_rng(0).integers(0, 256, (batch, 3, predictor.size, predictor.size)).astype(np.float32)
    predictor.session.run(predictor.output_names, {"image": tensor})  # warm-up
    runs = max(1, images // batch)
    start = time.perf_counter()
    for _ in range(runs):
        predictor.session.run(predictor.output_names, {"image": tensor})
    seconds = time.perf_counter() - start
    return {"images": runs * batch, "seconds": seconds, "images_per_s": runs * batch / seconds}


def run_tool(command: list[str], count: int, record: Path | None = None) -> dict:
    """Wall time of a tool in its own process; with ``record`` also its own images/s (scan.json)."""
    with tempfile.TemporaryFile("w+") as errors:
        usage = run_measured([sys.executable, *command], stdout=subprocess.DEVNULL, stderr=errors)
        if usage["returncode"] not in (0, 1):  # 1: done, with error rows (counted)
            errors.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{errors.read()[-3000:]}")
    seconds = usage["wall_s"]
    result = {
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "wall_images_per_s": count / seconds,
        "cpu": usage,
    }
    if record:
        run = json.loads(record.read_text())["this_run"]
        result.update(images_per_s=run["images_per_s"], seconds=run["seconds"])
    return result


def measure_in_subprocess(setting: str, args: argparse.Namespace) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--measure", setting, *sys.argv[1:]], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"measuring {setting} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    cpus = available_cpus()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--model", type=Path, default=REPO / "work_dirs/demo/model.onnx")
    parser.add_argument("--side", type=int, default=640, help="longer side of the pool's JPEGs, px")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=cpus, help="decoding processes")
    parser.add_argument("--threads", type=int, default=cpus, help="onnxruntime threads")
    parser.add_argument("--with-predict", action="store_true", help="also time tools/predict.py")
    parser.add_argument("--with-ray-tasks", action="store_true", help="also time the Ray engine's decoding tasks")
    parser.add_argument("--out", type=Path, default=REPO / "work_dirs/scan_speed")
    parser.add_argument("--measure", choices=["decode", "ort"], help=argparse.SUPPRESS)  # one setting, in a child
    args = parser.parse_args()
    if args.with_ray_tasks and cpus < 2:
        raise SystemExit("--with-ray-tasks needs 2 CPUs or more (two half-CPU actors and a decoding task)")
    if not args.model.exists():
        raise SystemExit(f"{args.model} is missing: `make demo` writes work_dirs/demo/model.onnx, or pass --model")
    pool = args.out / f"pool-{args.images}-{args.side}px"
    if args.measure:
        from waterdrop.runtime import Predictor

        size = Predictor(args.model, threads=1).size
        if args.measure == "decode":
            result = measure_decode(pool, size, args.workers, args.batch_size)
        else:
            result = measure_ort(args.model, args.threads, args.batch_size, args.images)
        print(json.dumps(result))
        return
    count = len(build_pool(pool, args.images, args.side))
    host = machine()  # before the measurements load the machine
    model, common = str(args.model), ["--batch-size", str(args.batch_size), "--quiet"]
    scans = {engine: args.out / f"scan-{engine}" for engine in ("local", "ray", "ray-tasks")}
    for folder in scans.values():
        shutil.rmtree(folder, ignore_errors=True)
    engine_args = {
        "local": ["--engine", "local", "--workers", str(args.workers), "--threads", str(args.threads)],
        "ray": ["--engine", "ray"],
        "ray-tasks": ["--engine", "ray", "--ray-decode", "tasks", "--workers", str(cpus), "--threads", "1",
                      "--ray-actor-cpus", "0.5"],
    }
    results = {
        "(a) decode limit": measure_in_subprocess("decode", args),
        "(b) ORT limit": measure_in_subprocess("ort", args),
    }
    if args.with_predict:
        results["(c) tools/predict.py"] = run_tool(
            ["tools/predict.py", model, str(pool), "--batch-size", str(args.batch_size),
             "--threads", str(args.threads)],
            count,
        )
    engines = [("(d) local engine", "local"), ("(e) Ray engine", "ray")]
    engines += [("(f) Ray engine, decoding tasks", "ray-tasks")] if args.with_ray_tasks else []
    for label, engine in engines:
        command = ["tools/scan.py", model, str(pool), "--out", str(scans[engine]), *common]
        results[label] = run_tool(command + engine_args[engine], count, scans[engine] / "scan.json")
    decode, infer = results["(a) decode limit"]["images_per_s"], results["(b) ORT limit"]["images_per_s"]
    limit = 1 / (1 / decode + 1 / infer)
    local = results["(d) local engine"]["images_per_s"]
    from waterdrop.runtime import Predictor

    meta = Predictor(args.model, threads=1).meta
    lines = [
        "# Pool-scan speed",
        "",
        f"{count} JPEGs at {args.side} px (longer side), model {args.model.name} ({meta.get('backbone')}, "
        f"{meta['input']['size']} px, {len(meta['tasks'])} tasks), batch {args.batch_size}, {args.workers} decoding "
        f"processes, {args.threads} ORT threads (Ray: one single-thread actor per CPU). Machine: {host}.",
        "Each setting ran in its own process. Engines: images/s from their own clock (scan.json, model loaded); "
        "wall: the whole command, start-up included.",
        "",
        f"Combined limit 1 / (1/a + 1/b) = {limit:.1f} images/s.",
        "",
        "| setting | images/s | wall images/s | % of the combined limit | % of the local engine |",
        "|---|---|---|---|---|",
    ]
    for label, result in results.items():
        wall = f"{result['wall_images_per_s']:.1f}" if "wall_images_per_s" in result else "-"
        engine = "engine" in label
        lines.append(
            f"| {label} | {result['images_per_s']:.1f} | {wall} | "
            + (f"{100 * result['images_per_s'] / limit:.0f} % | " if engine else "- | ")
            + (f"{100 * result['images_per_s'] / local:.0f} % |" if engine else "- |")
        )
    report = "\n".join(lines) + "\n"
    print(report)
    (args.out / "report.md").write_text(report)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "machine": host,
                "args": vars(args) | {"model": str(args.model), "out": str(args.out)},
                "combined_limit": limit,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
