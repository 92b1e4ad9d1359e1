"""A faiss index of a pool's image embeddings, built from scan shards, grown as shards arrive.

Layout of an index folder::

    INDEX/index.json          the model's embedding entry (its hash), the index kind and its
                              settings, and every shard indexed so far with its id range
    INDEX/vectors.faiss       the faiss index; ids are consecutive from 0 in indexing order
    INDEX/rows/part-NNNNNN.parquet   id -> path, one part per indexed shard

The embeddings are L2-normalised, so inner product is cosine similarity. The kind is chosen
once, from the pool's size and a memory budget (``plan_index``): an exact flat index for
small pools; beyond that an inverted file over 8-bit scalar-quantised vectors (a byte per
dimension, recall close to exact) while that fits the budget, else inverted file with
product quantisation (fewer bytes per vector, a lower recall). Compressed kinds are trained
on a sample drawn from every shard, then the shards are added one at a time, so building
never holds the pool's embeddings in memory. A later build adds only the shards it has not
indexed; a shard is indexed once it exists (a scan writes shards atomically), so the shards
of an interrupted scan that are there are complete.

Torch-free: faiss, pyarrow and numpy.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

try:
    import faiss
except ImportError as err:  # the runtime install does not have it
    raise ImportError(f"pool search needs faiss ({err}); install it with: pip install waterdrop[scan]") from err

from waterdrop.contract import EMBEDDING_OUTPUT

INDEX_FORMAT = 1
GiB = 1 << 30
#: Up to this many vectors the index is exact: a flat search of them takes milliseconds.
EXACT_UP_TO = 250_000
#: Bytes per vector beside its codes: its int64 id in the inverted lists, and slack for the lists.
ID_BYTES = 8
OVERHEAD = 1.1
#: Training vectors per inverted list (faiss warns below 39).
TRAIN_PER_LIST = 50
MAX_TRAIN = 200_000


class SearchError(ValueError):
    """An index that cannot be built, grown or searched as asked; the message says why."""


@dataclass
class IndexPlan:
    kind: str  # "flat", "ivf_sq8" or "ivf_pq"
    dim: int
    lists: int = 0  # inverted lists
    pq_bytes: int = 0  # ivf_pq: sub-quantisers of one byte each
    nprobe: int = 0  # lists searched per query (``calibrate_nprobe``)

    @property
    def bytes_per_vector(self) -> float:
        code = {"flat": 4 * self.dim, "ivf_sq8": self.dim, "ivf_pq": self.pq_bytes}[self.kind]
        return code + (0 if self.kind == "flat" else ID_BYTES)

    def factory(self) -> str:
        """The faiss index factory string."""
        if self.kind == "flat":
            return "IDMap2,Flat"
        return f"IVF{self.lists},{'SQ8' if self.kind == 'ivf_sq8' else f'PQ{self.pq_bytes}'}"


def _lists_for(count: int) -> int:
    """Inverted lists: about sqrt(count), a power of two. faiss's guide suggests 4 to 16 x
    sqrt(count); fewer lists keep training (k-means over 50 vectors a list) within minutes on a
    few cores, and calibrated probing keeps the recall (RESULTS.md, pool_index.py)."""
    return int(2 ** round(math.log2(max(16.0, math.sqrt(count)))))


def plan_index(count: int, dim: int, memory_budget: float = 4 * GiB) -> IndexPlan:
    """The index for ``count`` vectors of ``dim`` within ``memory_budget`` bytes.

    Raises:
        SearchError: not even the smallest product-quantised code fits.
    """
    if count <= EXACT_UP_TO and count * 4 * dim * OVERHEAD <= memory_budget:
        return IndexPlan("flat", dim)
    lists = _lists_for(count)
    centroids = lists * dim * 4
    if count * (dim + ID_BYTES) * OVERHEAD + centroids <= memory_budget:
        return IndexPlan("ivf_sq8", dim, lists)
    allowed = (memory_budget - centroids) / (count * OVERHEAD) - ID_BYTES
    fitting = [m for m in range(1, dim + 1) if dim % m == 0 and m <= allowed and m <= 96]
    if not fitting:
        need = count * (ID_BYTES + 4) * OVERHEAD + centroids
        raise SearchError(f"{count:,} vectors do not fit in {memory_budget / GiB:.2f} GiB even at 4 bytes each "
                          f"(needs about {need / GiB:.2f} GiB); give a larger --memory-gib")
    return IndexPlan("ivf_pq", dim, lists, pq_bytes=max(fitting))


def shard_files(scan: Path) -> list[Path]:
    """A scan folder's finished shards, in order (hidden temporary files are not shards)."""
    return sorted((Path(scan) / "shards").glob("shard-*.parquet"))


def scan_embedding(scan: Path) -> dict:
    """The embedding entry of the model a scan folder was scanned with.

    Raises:
        SearchError: not a scan folder, or scanned without ``--embeddings``.
    """
    record = Path(scan) / "scan.json"
    if not record.is_file():
        raise SearchError(f"{scan}: no scan.json; give a folder written by tools/scan.py")
    meta = json.loads(record.read_text())
    entry = meta.get("model_metadata", {}).get("embedding")
    if not meta.get("embeddings") or entry is None:
        raise SearchError(f"{scan}: scanned without embeddings; scan again with tools/scan.py --embeddings")
    return entry


def read_vectors(shard: Path, dim: int) -> tuple[np.ndarray, list[str]]:
    """The float32 embeddings and paths of a shard's scored rows (error rows have none)."""
    table = pq.read_table(shard, columns=["path", "error", EMBEDDING_OUTPUT])
    table = table.filter(pc.is_null(table.column("error")))
    if not len(table):
        return np.zeros((0, dim), np.float32), []
    column = table.column(EMBEDDING_OUTPUT).combine_chunks()
    vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(table), -1)
    if vectors.shape[1] != dim:
        raise SearchError(f"{shard}: embeddings of {vectors.shape[1]} dimensions, not {dim}")
    return vectors, table.column("path").to_pylist()


def _scored_rows(shard: Path) -> int:
    return pq.read_table(shard, columns=["error"]).column("error").null_count  # error rows have an error


def calibrate_nprobe(index: faiss.Index, sample: np.ndarray, target: float = 0.97, queries: int = 200,
                     seed: int = 0) -> tuple[int, float]:
    """The fewest inverted lists to search for recall@10 >= ``target`` against exact search,
    measured on ``sample`` (at most 20,000 vectors) in a copy of the trained, empty ``index``,
    queried with 200 other vectors of it; (nprobe, the recall it gave). Where the codes cap the
    recall below ``target`` (product quantisation) it stops where doubling nprobe gains less
    than 0.005. On a whole pool the same
    nprobe recalls less (0.954 on the sample, 0.913 on 1M vectors: RESULTS.md, pool_index.py),
    hence a target above the 0.9 aimed at."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sample))
    asked, base = sample[order[:queries]], sample[order[queries:queries + 20_000]]  # queries are not in the base
    probe = faiss.clone_index(index)
    probe.add(base)
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    _, truth = exact.search(asked, 10)
    lists = faiss.extract_index_ivf(probe)
    nprobe, recall = 1, 0.0
    while True:
        lists.nprobe = nprobe
        _, found = probe.search(asked, 10)
        before, recall = recall, float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
        # A product-quantised code caps the recall below the target: stop where probing more stops paying.
        stalled = nprobe > 1 and recall - before < 0.005
        if recall >= target or nprobe >= lists.nlist or stalled:
            return (nprobe // 2 if stalled else nprobe), recall
        nprobe = min(2 * nprobe, lists.nlist)


def _training_sample(shards: list[Path], dim: int, size: int, seed: int = 0) -> np.ndarray:
    """About ``size`` vectors drawn evenly from every shard, one shard in memory at a time."""
    total = sum(_scored_rows(shard) for shard in shards)
    rng = np.random.default_rng(seed)
    parts = []
    for shard in shards:
        vectors, _ = read_vectors(shard, dim)
        take = min(len(vectors), math.ceil(size * len(vectors) / max(total, 1)))
        parts.append(vectors[rng.choice(len(vectors), take, replace=False)] if take else vectors[:0])
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


class PoolIndex:
    """An index folder: build or grow it from scans, search it, map ids back to paths."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.record_path = self.folder / "index.json"
        if not self.record_path.is_file():
            raise SearchError(f"{self.folder}: no index.json; build one with tools/search_pool.py build")
        self.record = json.loads(self.record_path.read_text())
        if self.record.get("format") != INDEX_FORMAT:
            raise SearchError(f"{self.folder}: index format {self.record.get('format')}, this waterdrop reads "
                              f"{INDEX_FORMAT}; rebuild it")
        self.plan = IndexPlan(**self.record["plan"])
        self.index = faiss.read_index(str(self.folder / "vectors.faiss"))
        recorded = int(self.record["count"])
        if self.index.ntotal > recorded:  # a build stopped between writing the index and its record
            self.index.remove_ids(faiss.IDSelectorRange(recorded, int(self.index.ntotal)))
        if self.plan.kind != "flat":
            faiss.extract_index_ivf(self.index).nprobe = self.plan.nprobe
        self._paths: dict[str, pa.ChunkedArray] = {}
        self._direct_map = False

    @property
    def embedding(self) -> dict:
        """The model's embedding entry the index was built with (its ``hash`` identifies it)."""
        return self.record["embedding"]

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def check_model(self, embedding: dict, what: str) -> None:
        """Refuse embeddings of another model than the index's.

        Raises:
            SearchError: ``what`` (a model file, a scan) embeds with another model.
        """
        if embedding.get("hash") != self.embedding.get("hash"):
            raise SearchError(f"{what} embeds with another model (embedding hash {str(embedding.get('hash'))[:12]}) "
                              f"than the index {self.folder} (hash {str(self.embedding.get('hash'))[:12]}); "
                              "rebuild the index from a scan with this model, or search with the index's model")

    def set_nprobe(self, nprobe: int | None) -> None:
        if nprobe and self.plan.kind != "flat":
            faiss.extract_index_ivf(self.index).nprobe = nprobe

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (queries, k), best first; id -1 where fewer were found."""
        queries = np.ascontiguousarray(queries, np.float32)
        return self.index.search(queries, min(k, max(self.count, 1)))

    def range_search(self, queries: np.ndarray, similarity: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """faiss's range search: (limits, similarities, ids) of every vector at or above ``similarity``."""
        return self.index.range_search(np.ascontiguousarray(queries, np.float32), similarity)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (decoded from their codes for a compressed index)."""
        if self.plan.kind != "flat" and not self._direct_map:
            faiss.extract_index_ivf(self.index).make_direct_map()
            self._direct_map = True
        if not len(ids):
            return np.zeros((0, self.plan.dim), np.float32)
        return self.index.reconstruct_batch(np.asarray(ids, np.int64))

    def paths(self, ids: np.ndarray | list[int]) -> list[str]:
        """The image path of every id."""
        found = {}
        ids = [int(i) for i in ids]
        for part in self.record["parts"]:
            first, count = part["first_id"], part["count"]
            wanted = [i for i in ids if first <= i < first + count]
            if not wanted:
                continue
            if part["file"] not in self._paths:
                self._paths[part["file"]] = pq.read_table(self.folder / part["file"], columns=["path"]).column("path")
            column = self._paths[part["file"]]
            found.update((i, column[i - first].as_py()) for i in wanted)
        return [found[i] for i in ids]


def _shard_key(scan_record: dict, shard: Path) -> str:
    """What identifies a shard's rows: the scanned source, the model's bytes and the shard's number
    (a scan folder moved or copied, or the same scan run twice, holds the same rows); the file's
    own path where the scan record does not say."""
    if scan_record.get("source") and scan_record.get("model_sha256"):
        return f"{scan_record['source']}|{scan_record['model_sha256']}|{shard.name}"
    return str(shard.resolve())


def build_index(scans: list[str | Path], out: str | Path, memory_budget: float = 4 * GiB,
                expected_count: int = 0, progress=print) -> dict:
    """Build the index at ``out`` from the scan folders, or grow it with their new shards.

    ``memory_budget`` and ``expected_count`` (the pool's size to come, when it is larger than
    what the scans hold now) choose the kind at the first build; growth beyond the budget is
    refused (the kind cannot change: rebuild into a new folder).

    Returns:
        The index record, with ``this_build``: shards and vectors added, seconds.

    Raises:
        SearchError: a scan without embeddings, scans (or the index) of another model, an index
            whose shards changed since they were indexed, growth beyond the memory budget.
    """
    started = time.perf_counter()
    out = Path(out)
    scans = [Path(scan) for scan in scans]
    entries = [(scan, scan_embedding(scan)) for scan in scans]
    embedding = entries[0][1]
    for scan, entry in entries[1:]:
        if entry.get("hash") != embedding.get("hash"):
            raise SearchError(f"{scan} was scanned with another model's embedding than {scans[0]}; "
                              "index scans of one model together")
    existing = PoolIndex(out) if (out / "index.json").is_file() else None
    if existing is not None:
        existing.check_model(embedding, f"the scan {scans[0]}")
    known = {part["shard"]: part for part in existing.record["parts"]} if existing else {}
    new, keys = [], []
    for scan in scans:
        scan_record = json.loads((scan / "scan.json").read_text())
        for shard in shard_files(scan):
            key = _shard_key(scan_record, shard)
            if key in known:
                if known[key]["bytes"] != shard.stat().st_size:
                    raise SearchError(f"{shard} changed since it was indexed; rebuild the index into a new folder")
            elif key not in keys:  # the same scan given twice
                new.append(shard)
                keys.append(key)
    dim = int(embedding["dim"])
    if existing is not None and not new:
        return {**existing.record, "this_build": {"shards_added": 0, "vectors_added": 0,
                                                  "seconds": round(time.perf_counter() - started, 2)}}
    if existing is None:
        count = sum(_scored_rows(shard) for shard in new)
        if not count:
            raise SearchError(f"no scored rows in {', '.join(map(str, scans))}: nothing to index")
        plan = plan_index(max(count, expected_count), dim, memory_budget)
        index = faiss.index_factory(dim, plan.factory(), faiss.METRIC_INNER_PRODUCT)
        if plan.kind != "flat":
            size = min(MAX_TRAIN, max(plan.lists * TRAIN_PER_LIST, 10_000), count)
            sample = _training_sample(new, dim, size)
            progress(f"index: training {plan.factory()} on {len(sample):,} of {count:,} vectors")
            index.train(sample)
            plan.nprobe, calibrated = calibrate_nprobe(index, sample)
            progress(f"index: searching {plan.nprobe} of {plan.lists} lists gave recall@10 {calibrated:.3f} against "
                     "exact search on the sample")
        record = {"format": INDEX_FORMAT, "embedding": embedding, "plan": asdict(plan),
                  "memory_budget_gib": round(memory_budget / GiB, 3), "planned_for": max(count, expected_count),
                  "parts": []}
    else:
        index, record, plan = existing.index, existing.record, existing.plan
        expected = existing.count + sum(_scored_rows(shard) for shard in new)
        budget = record["memory_budget_gib"] * GiB
        size = expected * plan.bytes_per_vector
        if size * OVERHEAD > budget:
            raise SearchError(f"the index would hold {expected:,} vectors, {size / GiB:.2f} "
                              f"GiB, beyond its budget of {record['memory_budget_gib']} GiB ({plan.kind}, planned for "
                              f"{record['planned_for']:,}); rebuild it into a new folder (--memory-gib, "
                              "--expected-vectors)")
        if plan.kind == "flat" and expected > EXACT_UP_TO * 2:
            progress(f"index: the exact index now holds {expected:,} vectors (planned for {record['planned_for']:,}); "
                     "searches slow down linearly: rebuild it into a new folder to get a compressed one")
    (out / "rows").mkdir(parents=True, exist_ok=True)
    added = 0
    for number, shard in enumerate(new):
        vectors, paths = read_vectors(shard, dim)
        first = int(index.ntotal)
        if len(vectors):
            index.add_with_ids(vectors, np.arange(first, first + len(vectors), dtype=np.int64))
        part = f"rows/part-{len(record['parts']):06d}.parquet"
        pq.write_table(pa.table({"id": pa.array(range(first, first + len(paths)), pa.int64()),
                                 "path": pa.array(paths, pa.string())}), out / part)
        record["parts"].append({"shard": keys[number], "file_path": str(shard.resolve()),
                                "bytes": shard.stat().st_size, "file": part, "first_id": first, "count": len(paths)})
        added += len(vectors)
        if (number + 1) % 10 == 0:
            progress(f"index: {number + 1} of {len(new)} new shards, {int(index.ntotal):,} vectors")
    # The index file and the record are replaced together, index first: a record never names
    # rows the index lacks (a crash between the two leaves rows the next build re-adds).
    temp = out / ".vectors.faiss.tmp"
    faiss.write_index(index, str(temp))
    os.replace(temp, out / "vectors.faiss")
    record.update(count=int(index.ntotal), this_build={"shards_added": len(new), "vectors_added": added,
                                                      "seconds": round(time.perf_counter() - started, 2)})
    temp = out / ".index.json.tmp"
    temp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(temp, out / "index.json")
    return record
