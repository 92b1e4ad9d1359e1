"""Do the heat maps point at the object, and what do they cost? (Grad-CAM and the ONNX file's maps)

    python benchmarks/explain.py [--run work_dirs/demo] [--out work_dirs/explain_bench] [--limit N]
        [--seconds 10]

Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016):
for every test image of the demo's ``scene_tags`` task with a ground-truth box of a tag (the
small objects ``glasses`` and ``ball``; waterdrop/data/demo.py records no region for any other
tag or task), a hit when the map's maximum lies inside the box. The map is taken at the model's
input size (ReLU and bilinear upsampling, ``waterdrop.explain.normalize_maps``, as the overlays
draw it); where several pixels share the maximum (a border cell upsampled with clamped edges is
a plateau) their mean position is the point. A map without any positive value shows nothing and
counts as a miss. Boxes are in pixels of the original image, which the model sees stretched to a
square, so the point is scaled back the same way. Hit rates are given exactly and with a
tolerance of ``TOLERANCE`` pixels of the original image.

Methods: Grad-CAM of the tag's logit (``waterdrop.explain.grad_cam``) at the deepest level
(stride 32) and at level -2 (stride 16); the tag's class activation map from the ONNX file
exported with ``cam=True`` (read through ``waterdrop.runtime.Predictor``), also taken raw (its
highest value, without the ReLU, so a map below zero everywhere still points somewhere);
baselines: the image centre, a seeded random point, and the random point's expected rate (box
area over image area). The detector of the scene_tags head, trained on these very boxes, is a
reference: the centre of its highest-scoring box of the tag.

Costs: the ONNX file without and with the maps (size; onnxruntime CPU images/s at batch 16
with 2 threads on random images, both files timed in one torch-free child process in
alternating 1 s slices after a warm-up, ``--seconds`` each); Grad-CAM time per image of one
target (torch, 2 threads, the settings timed in turn, one call each, until each has had
``--seconds`` / 2) beside a plain forward of every task; and the parity of every ONNX output
with PyTorch at batch 1 and 3 as ``export_onnx`` reports it.

``--limit N`` takes the first N test images that have a box. Writes OUT/results.json (every
number) and OUT/report.md (the tables, also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TASK = "scene_tags"
TOLERANCE = 4  # pixels of the original (128 px) image, about 6 px of the 192 px input
BATCH = 16
THREADS = 2
GRAD_CAM_LEVELS = {-1: "Grad-CAM, level -1 (stride 32)", -2: "Grad-CAM, level -2 (stride 16)"}
METHODS = {**{f"grad_cam{level}": title for level, title in GRAD_CAM_LEVELS.items()},
           "onnx_cam": "class activation map, ONNX file (stride 32)",
           "onnx_cam_raw": "class activation map, ONNX file, raw maximum (no ReLU)",
           "centre": "image centre", "random": "random point (seed 0)",
           "random_expected": "random point, expected (box area / image area)",
           "detector": "reference: SSD detector's top box centre (trained on the boxes)"}


def boxed_items(manifest: Path, limit: int | None) -> list[dict]:
    """One item per (image, tag) with boxes of a tag the image carries; ``limit`` caps the images."""
    items, images = [], 0
    for line in manifest.read_text().splitlines():
        entry = json.loads(line) if line.strip() else {}
        boxes = {}
        for box in entry.get("boxes", []):
            if box["label"] in entry["labels"]:  # a box of an absent tag would be a manifest error, not an object
                boxes.setdefault(box["label"], []).append(box["box"])
        if not boxes:
            continue
        if limit is not None and images == limit:
            break
        images += 1
        items += [{"image": str(manifest.parent / entry["image"]), "tag": tag, "boxes": found}
                  for tag, found in sorted(boxes.items())]
    return items


def peaks(maps: np.ndarray, relu: bool = True) -> np.ndarray:
    """(N, H, W) maps -> (N, 2) x, y of each maximum (pixel centres; tied pixels: their mean);
    NaN for a map without a positive value when ``relu`` (it shows nothing)."""
    points = []
    for single in maps:
        ys, xs = np.nonzero(single == single.max())
        flat = relu and single.max() <= 0
        points.append((np.nan, np.nan) if flat else (xs.mean() + 0.5, ys.mean() + 0.5))
    return np.array(points)


def inside(point: tuple[float, float], boxes: list, tolerance: float) -> bool:
    x, y = point
    return any(x1 - tolerance <= x <= x2 + tolerance and y1 - tolerance <= y <= y2 + tolerance
               for x1, y1, x2, y2 in boxes)


def box_fraction(boxes: list, size: tuple[int, int], tolerance: float) -> float:
    """The fraction of the image's pixel centres inside the (widened) boxes: a random point's hit chance."""
    width, height = size
    xs, ys = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    covered = np.zeros_like(xs, dtype=bool)
    for x1, y1, x2, y2 in boxes:
        covered |= (xs >= x1 - tolerance) & (xs <= x2 + tolerance) & (ys >= y1 - tolerance) & (ys <= y2 + tolerance)
    return float(covered.mean())


def chunk_maps(net, predictor, batch: np.ndarray, tags: list[int], size: int) -> tuple[dict, dict]:
    """One batch's maps of each image's own tag, by method, at the input size (``*_raw``: not
    ReLU'd), and the torch outputs of every task (detector boxes, probabilities, maps)."""
    import torch

    from waterdrop.explain import grad_cam, normalize_maps

    labels, rows = net.heads[TASK].labels, np.arange(len(batch))
    _, onnx_maps = predictor.explain_batch(batch, [(size, size)] * len(batch))
    with torch.no_grad():
        outputs = net.forward_all(torch.from_numpy(batch), stack_tasks=False, cams=True)
    raw = {"onnx_cam": np.stack([maps[TASK][tag] for maps, tag in zip(onnx_maps, tags)]),
           "torch_cam": outputs[f"{TASK}.cam"].numpy()[rows, tags]}
    # The same ReLU and upsampling as Grad-CAM's, so only the maps differ.
    maps = {name: normalize_maps(torch.from_numpy(value), (size, size)).numpy() for name, value in raw.items()}
    maps["onnx_cam_raw"] = torch.nn.functional.interpolate(torch.from_numpy(raw["onnx_cam"])[:, None], (size, size),
                                                           mode="bilinear", align_corners=False)[:, 0].numpy()
    maps["raw_diff"] = np.abs(raw["onnx_cam"] - raw["torch_cam"])
    for level in GRAD_CAM_LEVELS:
        found = np.zeros((len(batch), size, size), dtype=np.float32)
        for tag in set(tags):  # each image is explained for its own tag only
            picked = [k for k in rows if tags[k] == tag]
            explained, _ = grad_cam(net, torch.from_numpy(batch[picked]), TASK, labels[tag], level=level)
            found[picked] = explained.numpy()
        maps[f"grad_cam{level}"] = found
    return maps, {name: value.numpy() for name, value in outputs.items()}


def detector_points(net, outputs: dict, chunk: list[dict], size: int) -> np.ndarray:
    """The centre of the detector's highest-scoring box of each item's tag (NaN: not a detector class)."""
    settings = net.features["detector"].settings.get(TASK) if "detector" in net.features else None
    detector = {"classes": settings.classes if settings else []}
    boxes, scores = outputs[f"{TASK}.det_boxes"], outputs[f"{TASK}.det_scores"]
    points = []
    for k, item in enumerate(chunk):
        if item["tag"] not in detector["classes"]:
            points.append((np.nan, np.nan))
            continue
        x1, y1, x2, y2 = boxes[k, scores[k, :, detector["classes"].index(item["tag"])].argmax()]
        points.append(((x1 + x2) / 2 * size, (y1 + y2) / 2 * size))
    return np.array(points)


def pointing(net, items: list[dict], onnx_cam_file: Path, size: int, thresholds: dict) -> dict:
    """Every method's point per item (original image pixels; None: no point), flat maps, how many
    boxed images the model tags, and how far the ONNX maps are from torch's."""
    from waterdrop.imageio import read_image, to_model_input
    from waterdrop.runtime import Predictor

    labels = net.heads[TASK].labels
    images = {item["image"]: read_image(item["image"]) for item in items}
    for item in items:
        item["size"] = (images[item["image"]].shape[1], images[item["image"]].shape[0])
    predictor = Predictor(onnx_cam_file, threads=THREADS)
    points = {method: [] for method in METHODS if method not in ("random", "random_expected")}
    flat = {method: 0 for method in ("onnx_cam", *(f"grad_cam{level}" for level in GRAD_CAM_LEVELS))}
    tagged = {name: {tag: 0 for tag in {item["tag"] for item in items}} for name in ("prob", "tag_prob")}
    agreement = {"max_abs_diff": 0.0, "points_differ": 0}
    for start in range(0, len(items), BATCH):
        chunk = items[start:start + BATCH]
        tags = [labels.index(item["tag"]) for item in chunk]
        maps, outputs = chunk_maps(net, predictor, to_model_input([images[i["image"]] for i in chunk], size), tags,
                                   size)
        found = {method: peaks(maps[method]) for method in ("torch_cam", *flat)}
        found.update(onnx_cam_raw=peaks(maps["onnx_cam_raw"], relu=False), centre=np.full((len(chunk), 2), size / 2),
                     detector=detector_points(net, outputs, chunk, size))
        for method in flat:
            flat[method] += int(np.isnan(found[method]).any(axis=1).sum())
        agreement["max_abs_diff"] = max(agreement["max_abs_diff"], float(maps["raw_diff"].max()))
        agreement["points_differ"] += int((~np.isclose(found["onnx_cam"], found["torch_cam"], equal_nan=True))
                                          .any(axis=1).sum())
        for k, item in enumerate(chunk):
            scale = np.array(item["size"]) / size
            for method in points:
                point = found[method][k] * scale
                points[method].append(None if np.isnan(point).any() else point.tolist())
            for name in tagged:  # "prob" is fused with the detector; Grad-CAM explains the tag logit alone
                tagged[name][item["tag"]] += int(outputs[f"{TASK}.{name}"][k, tags[k]] >= thresholds[TASK][item["tag"]])
    rng = np.random.default_rng(0)
    points["random"] = [[rng.uniform(0, item["size"][0]), rng.uniform(0, item["size"][1])] for item in items]
    return {"points": points, "flat_maps": flat, "tagged": tagged, "torch_vs_onnx_cam": agreement}


def hit_rates(items: list[dict], points: dict) -> dict:
    """Per tag, per method and tolerance: hits over images, a missing point a miss
    (``random_expected``: the expected rate; a method without any point there: n/a)."""
    rates = {}
    for tag in sorted({item["tag"] for item in items}):
        chosen = [k for k, item in enumerate(items) if item["tag"] == tag]
        rates[tag] = {"images": len(chosen)}
        for tolerance in (0, TOLERANCE):
            for method in METHODS:
                key = f"{method}@{tolerance}"
                if method == "random_expected":
                    fractions = [box_fraction(items[k]["boxes"], items[k]["size"], tolerance) for k in chosen]
                    rates[tag][key] = {"rate": float(np.mean(fractions))}
                elif all(points[method][k] is None for k in chosen):
                    rates[tag][key] = {"rate": None}
                else:
                    hits = sum(points[method][k] is not None and inside(points[method][k], items[k]["boxes"], tolerance)
                               for k in chosen)
                    rates[tag][key] = {"hits": hits, "count": len(chosen), "rate": hits / len(chosen)}
    return rates


def time_in_turn(settings: list[tuple], seconds: float) -> list[dict]:
    """Seconds per call of each ``(name, batch, call)``: 2 warm-up calls each, then one call of
    each in turn until every one has had ``seconds`` (3 calls at least), so that a change in the
    load of the shared cores hits every setting alike."""
    for _, _, call in settings:
        for _ in range(2):
            call()
    durations = [[] for _ in settings]
    while min(len(d) for d in durations) < 3 or min(sum(d) for d in durations) < seconds:
        for (_, _, call), spent in zip(settings, durations):
            begin = time.perf_counter()
            call()
            spent.append(time.perf_counter() - begin)
    return [{"what": name, "batch": batch, "runs": len(spent), "median_s": float(np.median(spent)),
             "ms_per_image": 1000 * float(np.median(spent)) / batch}
            for (name, batch, _), spent in zip(settings, durations)]


def grad_cam_cost(net, items: list[dict], size: int, seconds: float) -> list[dict]:
    """ms per image of one Grad-CAM target, beside a forward of every task without gradients."""
    import torch

    from waterdrop.explain import grad_cam
    from waterdrop.imageio import read_image, to_model_input

    pool = [read_image(item["image"]) for item in items[:BATCH]]
    batch = torch.from_numpy(to_model_input((pool * BATCH)[:BATCH], size))
    target = items[0]["tag"]

    def forward():
        with torch.no_grad():
            net.forward_all(batch, stack_tasks=False)

    settings = [("forward of every task, no gradient (forward_all)", BATCH, forward)]
    for level, title in GRAD_CAM_LEVELS.items():
        for count in (1, BATCH) if level == -1 else (BATCH,):
            settings.append((f"{title}, {TASK}/{target}", count,
                             lambda level=level, count=count: grad_cam(net, batch[:count], TASK, target, level=level)))
    return time_in_turn(settings, seconds)


def measure_ort(files: list[str], size: int, seconds: float) -> dict:
    """In a torch-free process: each file's images/s at batch ``BATCH`` with ``THREADS`` threads,
    the files timed in alternating 1 s slices so that a change in the load hits both alike."""
    from waterdrop.runtime import Predictor

    batch = np.random.default_rng(0).integers(0, 256, (BATCH, 3, size, size)).astype(np.float32)
    sessions = [Predictor(f, threads=THREADS).session for f in files]
    for session in sessions:
        warm_start, runs = time.perf_counter(), 0
        while runs < 5 or time.perf_counter() - warm_start < 2:  # the first runs allocate and plan
            session.run(None, {"image": batch})
            runs += 1
    durations = [[] for _ in files]
    while min(sum(d) for d in durations) < seconds:
        for session, spent in zip(sessions, durations):
            slice_start = time.perf_counter()
            while time.perf_counter() - slice_start < 1:
                begin = time.perf_counter()
                session.run(None, {"image": batch})
                spent.append(time.perf_counter() - begin)
    return {f: {"runs": len(d), "images_per_s": len(d) * BATCH / sum(d), "median_ms": 1000 * float(np.median(d))}
            for f, d in zip(files, durations)}


def cell(entry: dict) -> str:
    if entry["rate"] is None:
        return "n/a"
    if "hits" not in entry:
        return f"{entry['rate']:.3f}"
    return f"{entry['rate']:.3f} ({entry['hits']}/{entry['count']})"


def report(results: dict) -> str:
    found = results["pointing"]
    rates, tags = found["hit_rates"], sorted(found["hit_rates"])
    lines = [f"Pointing game on `{TASK}` test images with a box of the tag ({found['images']} images): hit rate "
             f"(hits/images); exact = the map's maximum inside the box, +-{TOLERANCE} px = within {TOLERANCE} px of "
             f"it (original 128 px images, about {TOLERANCE * 1.5:g} px of the 192 px input). A map without a "
             "positive value counts as a miss.", "",
             "| method | " + " | ".join(f"{tag} (n={rates[tag]['images']}) exact | {tag} +-{TOLERANCE} px"
                                       for tag in tags) + " |",
             "|---|" + "---|" * (2 * len(tags))]
    for method, title in METHODS.items():
        lines.append(f"| {title} | " + " | ".join(cell(rates[tag][f"{method}@{t}"]) for tag in tags
                                                  for t in (0, TOLERANCE)) + " |")
    agreement = found["torch_vs_onnx_cam"]
    lines += ["", "Maps without a positive value (no point): " + ", ".join(
                  f"{METHODS[m]} {n}" for m, n in found["flat_maps"].items()) + ".",
              "Boxed images the model tags (at its thresholds): " + ", ".join(
                  f"{tag} {found['tagged']['prob'][tag]}/{rates[tag]['images']} fused with the detector, "
                  f"{found['tagged']['tag_prob'][tag]} by the tag logit alone" for tag in tags) + ".",
              f"ONNX maps against torch `forward_all(cams=True)` on these images: max abs diff "
              f"{agreement['max_abs_diff']:.2e}; points that differ: {agreement['points_differ']}.", ""]
    cost = results["cost"]
    lines += [f"ONNX file and onnxruntime CPU throughput (batch {BATCH}, {THREADS} threads, random images, "
              f"{results['args']['seconds']:g} s each after a warm-up, in alternating 1 s slices):", "",
              "| export | file MiB | images/s | median ms / batch | export took (s) |", "|---|---|---|---|---|"]
    for name, entry in cost["onnx"].items():
        lines.append(f"| {name} | {entry['mib']:.2f} | {entry['images_per_s']:.1f} | {entry['median_ms']:.0f} | "
                     f"{entry['export_s']:.0f} |")
    lines += ["", f"Grad-CAM on CPU (torch, {THREADS} threads, test images; median over >= 3 calls, the settings "
              f"in turn until each had {results['args']['seconds'] / 2:g} s):", "",
              "| what | batch | calls | ms / image |", "|---|---|---|---|"]
    lines += [f"| {row['what']} | {row['batch']} | {row['runs']} | {row['ms_per_image']:.1f} |"
              for row in cost["grad_cam"]]
    plain_worst = max(cost["parity"]["without maps"].values())
    lines += ["", "Parity of the export with maps: max abs diff against PyTorch at batch 1 and 3, as `export_onnx` "
              f"reports it (the export without maps: worst {plain_worst:.2e}):", "",
              "| output | max abs diff |", "|---|---|"]
    lines += [f"| {name} | {diff:.2e} |" for name, diff in cost["parity"]["with --cam maps"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "work_dirs/demo", help="trained run folder or checkpoint")
    parser.add_argument("--out", type=Path, default=REPO / "work_dirs/explain_bench")
    parser.add_argument("--limit", type=int, help="the first N test images with a box (default: all)")
    parser.add_argument("--seconds", type=float, default=10.0, help="onnxruntime timing per file; half for torch")
    parser.add_argument("--measure-ort", nargs="+", help=argparse.SUPPRESS)  # the torch-free child
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_ort:
        print(json.dumps(measure_ort(args.measure_ort, args.size, args.seconds)))
        return

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ablation import machine

    from waterdrop.engine.checkpoint import best_checkpoint, load_net, recorded_thresholds
    from waterdrop.export import export_onnx

    began = time.perf_counter()
    torch.set_num_threads(THREADS)
    host, load = machine(), os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: load average {load:.1f}: other processes share the cores; timings are low and noisy",
              file=sys.stderr)
    checkpoint = best_checkpoint(args.run)
    net, cfg, meta = load_net(checkpoint)
    thresholds = recorded_thresholds(checkpoint, meta)[0]
    size = cfg.model.input_size
    args.out.mkdir(parents=True, exist_ok=True)
    onnx, parity = {}, {}
    for name, cam in (("without maps", False), ("with --cam maps", True)):
        path = args.out / ("model.cam.onnx" if cam else "model.onnx")
        start = time.perf_counter()
        parity[name] = export_onnx(net, cfg, thresholds, path, cam=cam)
        onnx[name] = {"file": str(path), "mib": path.stat().st_size / 2**20, "export_s": time.perf_counter() - start}
        print(f"exported {path} in {onnx[name]['export_s']:.0f} s", flush=True)

    manifest = next(task.test for task in cfg.tasks if task.name == TASK)
    items = boxed_items(manifest, args.limit)
    found = pointing(net, items, Path(onnx["with --cam maps"]["file"]), size, thresholds)
    found["hit_rates"] = hit_rates(items, found["points"])
    found["images"] = len({item["image"] for item in items})
    print(f"pointing game on {found['images']} images done", flush=True)

    grad_cam_rows = grad_cam_cost(net, items, size, args.seconds / 2)
    child = subprocess.run([sys.executable, __file__, "--measure-ort", *(e["file"] for e in onnx.values()),
                            "--size", str(size), "--seconds", str(args.seconds)],
                           capture_output=True, text=True, cwd=REPO)
    if child.returncode:
        raise SystemExit(f"onnxruntime timing failed:\n{child.stderr[-3000:]}")
    speeds = json.loads(child.stdout.splitlines()[-1])
    for entry in onnx.values():
        entry.update(speeds[entry["file"]])

    results = {"machine": host, "load_average": {"start": load, "end": os.getloadavg()[0]},
               "checkpoint": str(checkpoint), "manifest": str(manifest), "tolerance_px": TOLERANCE,
               "args": {"limit": args.limit, "seconds": args.seconds}, "items": items, "pointing": found,
               "cost": {"onnx": onnx, "grad_cam": grad_cam_rows, "parity": parity},
               "minutes": (time.perf_counter() - began) / 60}
    text = report(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "report.md").write_text(text)
    print(text)
    print(f"{results['minutes']:.1f} min; machine: {host}; load average {load:.1f} at the start, "
          f"{results['load_average']['end']:.1f} at the end")


if __name__ == "__main__":
    main()
