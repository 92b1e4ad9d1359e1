"""Decoding no more pixels than the model needs: speed, and what it changes in the scores (CPU).

    python benchmarks/real_photos.py && python benchmarks/retrieval.py   # photographs, exported models
    python benchmarks/reduced_decode.py [--out work_dirs/reduced_decode]

Speed: the suite's 84 source photographs (wallpapers and documentation images shipped in Debian
packages), re-encoded as JPEG (quality 90) with their long side at 800, 1600 and 3000 px; per
image, read + decode + resize to 192 x 192 on one thread, whole (``read_image(path)``) and at the
smallest DCT scale that keeps 192 px on the short side (``read_image(path, 192)``, what the
runtime, the scanner, evaluation and calibration now do). Images/s over three passes, the best.

Scores: the three real-photo tasks' test splits (300 images each) re-encoded with their long
side at 1600 px (upscaled from the suite's 230-460 px, JPEG quality 95, so 1/4 decoding applies),
scored by the joint model of task_lifecycle.py (exported by retrieval.py) from whole and from
reduced decodes: per task the largest and mean absolute difference of the score, and AP both ways.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, machine  # noqa: E402

from waterdrop.evaluation.metrics import average_precision
from waterdrop.imageio import read_image, resize, to_model_input
from waterdrop.runtime import Predictor

TASKS = ["collage", "jpeg_artifacts", "plain_background"]


def reencode(source: Path, target: Path, long_side: int, quality: int) -> None:
    if target.is_file():
        return
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    scale = long_side / max(image.shape[:2])
    image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                       interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    target.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, quality])


def speed(paths: list[Path], min_side: int | None, size: int = 192, passes: int = 3) -> float:
    best = 0.0
    for _ in range(passes):
        start = time.perf_counter()
        for path in paths:
            resize(read_image(path, min_side), size)
        best = max(best, len(paths) / (time.perf_counter() - start))
    return round(best, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "work_dirs/reduced_decode")
    parser.add_argument("--model", type=Path, default=REPO / "work_dirs/retrieval/joint/model.onnx")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    originals = sorted((REPO / "work_dirs/real_photos_cache/photos").glob("*"))
    result: dict = {"machine": machine(), "speed_images_per_s": {}, "scores": {}}
    for side in (800, 1600, 3000):
        paths = [args.out / f"photos_{side}" / f"{p.stem}.jpg" for p in originals]
        for source, target in zip(originals, paths):
            reencode(source, target, side, 90)
        result["speed_images_per_s"][str(side)] = {"whole": speed(paths, None), "reduced": speed(paths, 192)}
        print(side, result["speed_images_per_s"][str(side)], flush=True)
    predictor = Predictor(args.model, threads=2)
    data = REPO / "work_dirs/real_photos"
    for task in TASKS:
        paths, truth = [], []
        for label in ("normal", "positive"):
            for source in sorted((data / task / "test" / label).glob("*.jpg")):
                target = args.out / "test_1600" / task / label / source.name
                reencode(source, target, 1600, 95)
                paths.append(target)
                truth.append(label == "positive")
        truth = np.array(truth)
        scores = {}
        for name, min_side in (("whole", None), ("reduced", predictor.size)):
            rows = []
            for start in range(0, len(paths), 32):
                images = [read_image(path, min_side) for path in paths[start:start + 32]]
                outputs = predictor.outputs(to_model_input(images, predictor.size), [f"{task}.prob"])
                rows.append(outputs[f"{task}.prob"].reshape(-1))
            scores[name] = np.concatenate(rows)
        difference = np.abs(scores["whole"] - scores["reduced"])
        result["scores"][task] = {"images": len(paths), "max_abs_difference": round(float(difference.max()), 5),
                                  "mean_abs_difference": round(float(difference.mean()), 5),
                                  "ap_whole": round(average_precision(scores["whole"], truth), 4),
                                  "ap_reduced": round(average_precision(scores["reduced"], truth), 4)}
        print(task, result["scores"][task], flush=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
