"""Pool index at scale: build time, memory per vector, query latency and recall@10 against exact
search, for pools of 1M and 10M embeddings; and what the embedding output costs a scan.

    python benchmarks/retrieval.py          # the real embeddings (work_dirs/retrieval/embeddings.npz)
    python benchmarks/pool_index.py [--sizes 1000000 10000000] [--memory-gib 4] [--out work_dirs/pool_index]
    python benchmarks/pool_index.py --scan-cost [--images 1200]

Vectors: drawn from a Gaussian mixture fitted to the real embeddings of the exported model
(64 k-means components of the 4,200 real photographs' embeddings, each with its own diagonal
variance), L2-normalised, float16 as a scan stores them. They are written as scan shards
(10,000 rows each) and indexed by ``waterdrop.search.build_index``, the code path of
tools/search_pool.py, so the build streams shards as it would on a real pool. Queries: 100
embeddings of real test photographs (seeds as a user gives them). Exact neighbours: a flat
inner-product search over every shard, streamed.

``--dedupe``: also the time of a pool-wide duplicate grouping (range search at cosine 0.95,
4 lists per vector). ``--scan-cost``: images/s of tools/scan.py's local engine on real photographs with and without
``--embeddings`` (same model, same images, alternated three times).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO  # noqa: E402

from waterdrop.search.index import GiB, PoolIndex, build_index
from waterdrop.search.query import duplicate_groups

SHARD = 10_000


def fit_mixture(real: np.ndarray, components: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights, means, standard deviations) of a diagonal Gaussian mixture fitted by k-means."""
    kmeans = faiss.Kmeans(real.shape[1], components, niter=30, seed=seed, verbose=False)
    kmeans.train(real.astype(np.float32))
    _, assigned = kmeans.index.search(real.astype(np.float32), 1)
    assigned = assigned[:, 0]
    weights = np.bincount(assigned, minlength=components) / len(real)
    spread = np.stack([real[assigned == c].std(0) if (assigned == c).sum() > 1 else real.std(0)
                       for c in range(components)])
    return weights, kmeans.centroids, spread


def write_pool(folder: Path, count: int, mixture, seed: int = 0) -> Path:
    """A scan folder of ``count`` mixture embeddings (reused when it is there)."""
    if (folder / "scan.json").is_file():
        return folder
    weights, means, spread = mixture
    dim = means.shape[1]
    rng = np.random.default_rng(seed)
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, count, SHARD)):
        size = min(SHARD, count - start)
        component = rng.choice(len(weights), size, p=weights)
        vectors = means[component] + spread[component] * rng.standard_normal((size, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        table = pa.table({
            "index": pa.array(np.arange(start, start + size), pa.int64()),
            "path": pa.array([f"/pool/{k:09d}.jpg" for k in range(start, start + size)], pa.string()),
            "error": pa.nulls(size, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float16).ravel()), dim)})
        pq.write_table(table, folder / "shards" / f"shard-{number:06d}.parquet")
    (folder / "scan.json").write_text(json.dumps({"embeddings": "float16", "model_metadata": {"embedding": {
        "output": "embedding", "dim": dim, "hash": f"mixture-{count}"}}}))
    return folder


def exact_neighbours(scan: Path, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Ids (in indexing order) of every query's k best inner products over all shards."""
    best_score = np.full((len(queries), k), -np.inf, np.float32)
    best_id = np.zeros((len(queries), k), np.int64)
    first = 0
    for shard in sorted((scan / "shards").glob("shard-*.parquet")):
        column = pq.read_table(shard, columns=["embedding"]).column("embedding").combine_chunks()
        vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), -1)
        scores = queries @ vectors.T
        ids = np.broadcast_to(np.arange(first, first + len(vectors)), scores.shape)
        merged_score = np.concatenate([best_score, scores], axis=1)
        merged_id = np.concatenate([best_id, ids], axis=1)
        top = np.argpartition(-merged_score, k, axis=1)[:, :k]
        best_score = np.take_along_axis(merged_score, top, 1)
        best_id = np.take_along_axis(merged_id, top, 1)
        first += len(vectors)
    return best_id


def index_row(count: int, mixture, queries: np.ndarray, out: Path, budget_gib: float, dedupe: bool = False) -> dict:
    scan = write_pool(out / f"pool_{count}", count, mixture)
    folder = out / f"index_{count}_{budget_gib:g}gib"
    if not (folder / "index.json").is_file():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        build_index([scan], folder, budget_gib * GiB)
        build_seconds = time.perf_counter() - start
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        (folder / "build.json").write_text(json.dumps({"seconds": build_seconds, "peak_rss_mib": peak_mib,
                                                       "rss_before_mib": before / 1024}))
    build = json.loads((folder / "build.json").read_text())
    index = PoolIndex(folder)
    truth = exact_neighbours(scan, queries)
    index.search(queries[:5], 10)  # warm-up
    latencies, found = [], []
    for query in queries:
        start = time.perf_counter()
        _, ids = index.search(query[None], 10)
        latencies.append(time.perf_counter() - start)
        found.append(ids[0])
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
    file_bytes = (folder / "vectors.faiss").stat().st_size
    extra = {}
    if dedupe:
        start = time.perf_counter()
        groups = duplicate_groups(index)
        extra = {"dedupe_s": round(time.perf_counter() - start, 1), "duplicate_groups": len(groups)}
    return {**extra, "vectors": count, "memory_budget_gib": budget_gib, "kind": index.plan.kind,
            "factory": index.plan.factory(),
            "nprobe": index.plan.nprobe, "build_s": round(build["seconds"], 1),
            "peak_rss_gib_during_build": round(build["peak_rss_mib"] / 1024, 2),
            "index_bytes_per_vector": round(file_bytes / count, 1), "index_file_gib": round(file_bytes / GiB, 2),
            "query_ms_median": round(1000 * float(np.median(latencies)), 2),
            "query_ms_p95": round(1000 * float(np.percentile(latencies, 95)), 2), "recall_at_10": round(recall, 3)}


def scan_cost(images: int, out: Path) -> dict:
    """Images/s of the local scan engine with and without embeddings, alternated three times."""
    import shutil

    from waterdrop.scan import scan_local

    model = REPO / "work_dirs/retrieval/heldout_collage/model.onnx"
    photos = sorted((REPO / "work_dirs/real_photos").glob("*/*/*/*.jpg"))[:images]
    listing = out / "scan_cost_paths.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    rates: dict[str, list[float]] = {"without": [], "with float16 embeddings": []}
    for _ in range(3):
        for label, embeddings in (("without", None), ("with float16 embeddings", "float16")):
            target = out / "scan_cost"
            shutil.rmtree(target, ignore_errors=True)
            record = scan_local(model, listing, target, embeddings=embeddings, progress=False)
            rates[label].append(record["this_run"]["images_per_s"])
    return {"images": len(photos), "model": str(model), "images_per_s": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--memory-gib", type=float, nargs="+", default=[4.0])
    parser.add_argument("--out", type=Path, default=REPO / "work_dirs/pool_index")
    parser.add_argument("--scan-cost", action="store_true")
    parser.add_argument("--dedupe", action="store_true", help="also time tools/search_pool.py dedupe's grouping")
    parser.add_argument("--images", type=int, default=1200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": []}
    results["machine"] = f"{faiss.omp_get_max_threads()} OpenMP threads"
    if args.scan_cost:
        results["scan_cost"] = scan_cost(args.images, args.out)
        print(json.dumps(results["scan_cost"], indent=1))
    else:
        stored = np.load(REPO / "work_dirs/retrieval/embeddings.npz")
        real = stored["heldout_collage:exported"].astype(np.float32)
        mixture = fit_mixture(real)
        queries = real[np.random.default_rng(1).choice(len(real), 100, replace=False)]
        for count in args.sizes:
            for budget in args.memory_gib:
                row = index_row(count, mixture, queries, args.out, budget, args.dedupe)
                results["rows"] = [r for r in results["rows"] if (r["vectors"], r["memory_budget_gib"]) !=
                                   (count, budget)] + [row]
                print(json.dumps(row))
                results_path.write_text(json.dumps(results, indent=1))
    results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
