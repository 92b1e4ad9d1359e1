"""Cold start: how well seed images find a task's positives in a pool, by embedding choice.

    python benchmarks/real_photos.py       # builds work_dirs/real_photos once
    python benchmarks/task_lifecycle.py    # the models (skips what it already trained)
    python benchmarks/retrieval.py [--data work_dirs/real_photos] [--out work_dirs/retrieval]

For each real-photo task T, the model that has never seen T is the one task_lifecycle.py trained
on the two other tasks (``<T>/production``); ``a_joint`` (all three tasks) is the model that knows
T, for reference; ``imagenet`` is the packaged ImageNet trunk before any training.

The pool: every ``normal`` image of the suite (all tasks, all splits: 2,100 real-photo negatives,
hard ones among them: the same source photographs as T's positives) plus T's test positives drawn
at 1 % and 5 % prevalence. Seeds: 5 or 20 of T's training positives (other source photographs
than the pool's positives). Per cell, the mean over 20 draws of seeds and pool positives of the
recall and precision of positives among the top 50, 100 and 500 candidates.

Embeddings compared (each L2-normalised; the candidates ranked by their highest cosine to any
seed, ``max``, or by the cosine to the seeds' mean, ``mean``):

* ``shared_avg`` / ``shared_gem``: the last shared level (before the first per-task BatchNorm),
  average or generalised-mean (p = 3) pooled;
  ``tasks_avg`` / ``tasks_gem``: each task's deepest level, pooled, normalised, averaged over tasks;
  ``both_avg``: the two above joined;
* ``imagenet_deep_avg`` / ``imagenet_deep_gem`` / ``imagenet_shared_avg``: the ImageNet trunk's
  deepest level and the same level as ``shared``;
* ``exported``: the ONNX file's own ``embedding`` output (what a scan writes), and ``exported_f16``
  the same stored as float16;
* baselines: ``random`` and ``phash`` (smallest pHash bit distance to any seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, machine  # noqa: E402

from waterdrop.curation.cleaning import hamming, phash
from waterdrop.engine.checkpoint import best_checkpoint, load_net
from waterdrop.export import export_onnx
from waterdrop.imageio import read_image, resize
from waterdrop.model.trunk import Trunk

TASKS = ["collage", "jpeg_artifacts", "plain_background"]
DRAWS = 20
TOPS = (50, 100, 500)


def suite_images(data: Path) -> list[tuple[Path, str, str, str]]:
    """(path, task, split, label folder) of every image of the suite."""
    return [(path, task, split, label) for task in TASKS for split in ("train", "val", "test")
            for label in ("normal", "positive") for path in sorted((data / task / split / label).glob("*.jpg"))]


def gem(maps: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    return maps.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


@torch.no_grad()
def embed(paths: list[Path], net=None, trunk: Trunk | None = None, size: int = 192) -> dict[str, np.ndarray]:
    """Every embedding option of one model for every image (PyTorch)."""
    out: dict[str, list] = {}
    for start in range(0, len(paths), 64):
        images = torch.from_numpy(np.stack([resize(read_image(p), size) for p in paths[start:start + 64]]))
        images = images.permute(0, 3, 1, 2).float()
        if net is not None:
            per_task = net.features_per_task(images)
            shared = per_task[0][net.first_branched - 1]
            deep = [feats[-1] for feats in per_task]
            rows = {"shared_avg": unit(shared.mean(dim=(2, 3))), "shared_gem": unit(gem(shared)),
                    "tasks_avg": unit(torch.stack([unit(d.mean(dim=(2, 3))) for d in deep]).mean(0)),
                    "tasks_gem": unit(torch.stack([unit(gem(d)) for d in deep]).mean(0))}
            rows["both_avg"] = unit(torch.cat([rows["shared_avg"], rows["tasks_avg"]], dim=1))
            levels = per_task[0][1:net.first_branched]
            rows["shared_multi_avg"] = unit(torch.cat([unit(f.mean(dim=(2, 3))) for f in levels], dim=1))
            rows["shared_multi_gem"] = unit(torch.cat([unit(gem(f)) for f in levels], dim=1))
        else:
            feats = trunk((images - 127.5) / 127.5)
            rows = {"imagenet_deep_avg": unit(feats[-1].mean(dim=(2, 3))), "imagenet_deep_gem": unit(gem(feats[-1])),
                    "imagenet_shared_avg": unit(feats[-2].mean(dim=(2, 3))),
                    "imagenet_shared_gem": unit(gem(feats[-2])),
                    "imagenet_multi_avg": unit(torch.cat([unit(f.mean(dim=(2, 3))) for f in feats[1:]], dim=1)),
                    "imagenet_multi_gem": unit(torch.cat([unit(gem(f)) for f in feats[1:]], dim=1)),
                    "imagenet_shared_multi_avg": unit(torch.cat([unit(f.mean(dim=(2, 3))) for f in feats[1:-1]],
                                                                dim=1))}
        for key, value in rows.items():
            out.setdefault(key, []).append(value.numpy())
    return {key: np.concatenate(parts) for key, parts in out.items()}


def exported_embeddings(run: Path, paths: list[Path], folder: Path) -> np.ndarray:
    """The ONNX file's ``embedding`` output for every image, through the runtime."""
    from waterdrop.runtime import Predictor

    model = folder / "model.onnx"
    if not model.is_file():
        net, cfg, meta = load_net(best_checkpoint(run))
        thresholds = {task.name: 0.5 for task in cfg.tasks}
        export_onnx(net, cfg, thresholds, model)
    predictor = Predictor(model)
    rows = []
    for start in range(0, len(paths), 64):
        images = [read_image(p) for p in paths[start:start + 64]]
        rows.append(predictor.embed_images(images))
    return np.concatenate(rows)


def rank(option: str, vectors: np.ndarray | None, seeds: np.ndarray, pool: np.ndarray, hashes: np.ndarray,
         rng: np.random.Generator, how: str) -> np.ndarray:
    """Pool positions, best candidate first."""
    if option == "random":
        return rng.permutation(len(pool))
    if option == "phash":
        distance = np.min([hamming(hashes[pool], int(h)) for h in hashes[seeds]], axis=0)
        return np.argsort(distance + rng.random(len(pool)) * 0.1, kind="stable")
    if how == "mean":
        centre = vectors[seeds].astype(np.float32).mean(0)
        similarity = vectors[pool].astype(np.float32) @ (centre / np.linalg.norm(centre))
    else:
        similarity = (vectors[pool].astype(np.float32) @ vectors[seeds].astype(np.float32).T).max(1)
    return np.argsort(-similarity, kind="stable")


def evaluate(task: str, images: list, vectors: dict[str, np.ndarray], hashes: np.ndarray) -> list[dict]:
    """Mean recall / precision at TOPS per option, seed count, prevalence and aggregation."""
    negatives = [k for k, (_, _, _, label) in enumerate(images) if label == "normal"]
    test_positives = [k for k, (_, t, split, label) in enumerate(images)
                      if t == task and split == "test" and label == "positive"]
    train_positives = [k for k, (_, t, split, label) in enumerate(images)
                       if t == task and split == "train" and label == "positive"]
    rows = []
    options = [(name, how) for name in vectors for how in ("max", "mean")] + [("random", "-"), ("phash", "max")]
    for seeds_count in (5, 20):
        for prevalence in (0.01, 0.05):
            count = round(prevalence * len(negatives) / (1 - prevalence))
            results: dict[tuple, list] = {}
            for draw in range(DRAWS):
                rng = np.random.default_rng(draw)
                seeds = rng.choice(train_positives, seeds_count, replace=False)
                positives = rng.choice(test_positives, count, replace=False)
                pool = np.concatenate([negatives, positives])
                is_positive = np.isin(pool, positives)
                for name, how in options:
                    order = rank(name, vectors.get(name), seeds, pool, hashes, rng, how)
                    hits = np.cumsum(is_positive[order])
                    results.setdefault((name, how), []).append([hits[k - 1] for k in TOPS])
            for (name, how), found in results.items():
                found = np.mean(found, axis=0)
                row = {"task": task, "seeds": seeds_count, "prevalence": prevalence, "positives": count,
                       "pool": len(negatives) + count, "embedding": name, "rank_by": how}
                for k, hits in zip(TOPS, found):
                    row[f"recall@{k}"] = round(float(hits / count), 4)
                    row[f"precision@{k}"] = round(float(hits / k), 4)
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "work_dirs/real_photos")
    parser.add_argument("--runs", type=Path, default=REPO / "work_dirs/task_lifecycle")
    parser.add_argument("--out", type=Path, default=REPO / "work_dirs/retrieval")
    parser.add_argument("--torch-only", action="store_true", help="leave out the exported files' embeddings")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    images = suite_images(args.data)
    paths = [p for p, *_ in images]
    cache = args.out / "embeddings.npz"
    stored = dict(np.load(cache)) if cache.is_file() else {}
    models = {f"heldout_{task}": args.runs / task / "production/run" for task in TASKS[:2]}
    models["joint"] = args.runs / "a_joint/run"
    timings = {}
    for name, run in [*models.items(), ("imagenet", None)]:
        if any(key.startswith(name + ":") for key in stored):
            continue
        start = time.perf_counter()
        if run is None:
            vectors = embed(paths, trunk=Trunk("tf_efficientnet_lite0", "imagenet").eval())
        else:
            vectors = embed(paths, net=load_net(best_checkpoint(run))[0])
        timings[name] = time.perf_counter() - start
        stored.update({f"{name}:{key}": value for key, value in vectors.items()})
        np.savez(cache, **stored)
    for name, run in models.items() if not args.torch_only else []:
        if f"{name}:exported" not in stored:
            stored[f"{name}:exported"] = exported_embeddings(run, paths, args.out / name)
            np.savez(cache, **stored)
    if "phash" not in stored:
        stored["phash"] = np.array([phash(read_image(p)) for p in paths], np.uint64)
        np.savez(cache, **stored)
    rows = []
    for task in TASKS:
        # The model that never saw the task where there is one; the joint model knows every task.
        sources = [f"heldout_{task}", "joint", "imagenet"] if f"heldout_{task}" in models else ["joint", "imagenet"]
        vectors = {}
        for source in sources:
            for key, value in stored.items():
                if key.startswith(source + ":"):
                    vectors[f"{source}/{key.split(':', 1)[1]}"] = value
        for key in [k for k in vectors if k.endswith("/exported")]:
            vectors[key + "_f16"] = vectors[key].astype(np.float16)
        rows += evaluate(task, images, vectors, stored["phash"])
    (args.out / "results.json").write_text(json.dumps({"machine": machine(), "timings_s": timings, "rows": rows},
                                                      indent=1))
    for row in rows:
        if row["rank_by"] in ("max", "-"):
            print(f"{row['task']:17s} seeds {row['seeds']:2d} prev {row['prevalence']:.2f} {row['embedding']:38s} "
                  f"{row['rank_by']:4s} R@50 {row['recall@50']:.3f} R@100 {row['recall@100']:.3f} "
                  f"R@500 {row['recall@500']:.3f} P@50 {row['precision@50']:.3f}")


if __name__ == "__main__":
    main()
