"""From seed embeddings to a ranked list of pool candidates, near copies folded; and pool-wide
near-duplicate groups through the index's range search."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from waterdrop.search.index import PoolIndex

#: Cosine similarity at or above which two embeddings are taken for copies of one photograph
#: (re-encodings, resizes, small crops); see RESULTS.md, retrieval.py, for how it was chosen.
COPY_SIMILARITY = 0.95


@dataclass
class Candidate:
    id: int
    similarity: float  # to the seeds (see ``find_candidates``)
    nearest_seed: int
    copies: list[int] = field(default_factory=list)  # ids folded into this one


@dataclass
class Candidates:
    ranked: list[Candidate]
    seed_copies: dict[int, list[int]]  # seed number -> pool ids that are copies of it
    searched: int  # distinct pool ids the seeds' searches returned


def seed_similarity(vectors: np.ndarray, seeds: np.ndarray, rank_by: str) -> tuple[np.ndarray, np.ndarray]:
    """(similarity to the seeds, nearest seed) of every row of ``vectors``: the highest cosine to
    any seed (``max``) or the cosine to the seeds' normalised mean (``mean``)."""
    every = vectors @ seeds.T
    nearest = every.argmax(1)
    if rank_by == "max":
        return every.max(1), nearest
    centre = seeds.mean(0)
    return vectors @ (centre / max(float(np.linalg.norm(centre)), 1e-12)), nearest


def find_candidates(index: PoolIndex, seeds: np.ndarray, top: int, rank_by: str = "max",
                    copy_similarity: float = COPY_SIMILARITY, depth: int | None = None) -> Candidates:
    """The ``top`` pool images most like the seeds, each with its folded copies.

    Every seed (and, ranking by the mean, the seeds' mean) searches the index for ``depth``
    neighbours (default: 2 x top + 50); the union is ranked by ``seed_similarity`` on the stored
    vectors. A candidate that is a copy of a seed is
    left out (listed under the seed); one that is a copy of a better-ranked candidate is folded
    into it, so the list is not twenty versions of one photograph.
    """
    seeds = np.ascontiguousarray(seeds, np.float32)
    depth = depth or 2 * top + 50
    queries = seeds
    if rank_by == "mean":  # the mean's own neighbours are the best by mean similarity
        centre = seeds.mean(0)
        queries = np.vstack([seeds, centre / max(float(np.linalg.norm(centre)), 1e-12)])
    _, ids = index.search(queries, depth)
    pool_ids = np.unique(ids[ids >= 0])
    vectors = index.vectors(pool_ids).astype(np.float32)
    if len(pool_ids):
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # codes decode approximately
    similarity, nearest = seed_similarity(vectors, seeds, rank_by)
    to_seed = (vectors @ seeds.T).max(1) if len(pool_ids) else np.zeros(0)
    seed_copies: dict[int, list[int]] = {}
    ranked: list[Candidate] = []
    kept_rows: list[int] = []
    for row in np.argsort(-similarity, kind="stable"):
        pool_id = int(pool_ids[row])
        if to_seed[row] >= copy_similarity:
            seed_copies.setdefault(int(nearest[row]), []).append(pool_id)
            continue
        if kept_rows:
            closeness = vectors[kept_rows] @ vectors[row]
            best = int(closeness.argmax())
            if closeness[best] >= copy_similarity:
                ranked[best].copies.append(pool_id)
                continue
        if len(ranked) < top:
            ranked.append(Candidate(pool_id, float(similarity[row]), int(nearest[row])))
            kept_rows.append(int(row))
    return Candidates(ranked, seed_copies, len(pool_ids))


def duplicate_groups(index: PoolIndex, similarity: float = COPY_SIMILARITY, batch: int = 4096,
                     nprobe: int | None = 4, progress=None) -> list[list[int]]:
    """Groups of two or more pool ids whose embeddings are at or above ``similarity`` (joined
    transitively), through the index's range search: no pairwise comparison of the pool. A
    vector found as a copy of an earlier one is not searched from again, so two copies that
    are each near an earlier vector but not near each other's group may stay apart.

    ``nprobe``: inverted lists searched per vector (a compressed index). Near duplicates lie
    far closer than the neighbours a query looks for, nearly always in the vector's own list,
    so a few lists find them at a fraction of a query's cost; None keeps the index's.
    """
    if nprobe is not None:
        index.set_nprobe(min(nprobe, index.plan.nprobe or nprobe))
    parent = np.arange(index.count)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, index.count, batch):
        ids = np.arange(start, min(start + batch, index.count))
        # A vector already found as a copy of an earlier one does not search again: a group of
        # n copies costs one search, not n searches of n results each.
        ids = ids[parent[ids] == ids]
        if not len(ids):
            continue
        limits, _, found = index.range_search(index.vectors(ids), similarity)
        queries = np.repeat(ids, np.diff(limits).astype(np.int64))
        for a, b in zip(queries[found != queries].tolist(), found[found != queries].tolist()):
            a, b = root(a), root(b)
            if a != b:
                parent[max(a, b)] = min(a, b)
        if progress:
            progress(f"dedupe: {ids[-1] + 1:,} of {index.count:,} vectors")
    roots = np.array([root(i) for i in range(index.count)]) if index.count else np.zeros(0, int)
    members = np.argsort(roots, kind="stable")
    groups = np.split(members, np.flatnonzero(np.diff(roots[members])) + 1) if index.count else []
    return sorted(([int(i) for i in g] for g in groups if len(g) > 1), key=lambda g: (-len(g), g[0]))
