"""Pool search (waterdrop.search, tools/search_pool.py): the embedding output, index plans, building
from scan shards and growing, seed queries with copies folded, pool-wide duplicate groups."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import write_registry
from waterdrop.runtime import Predictor
from waterdrop.scan import ScanError, scan_local
from waterdrop.search import index as index_module
from waterdrop.search.index import GiB, PoolIndex, SearchError, build_index, plan_index
from waterdrop.search.query import duplicate_groups, find_candidates

REPO = Path(__file__).resolve().parents[1]
DIM = 16


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def fake_scan(folder: Path, shards: list[np.ndarray], model_hash: str = "a" * 64, errors_every: int = 0) -> Path:
    """A scan folder as tools/scan.py --embeddings writes it, with the given embeddings per shard."""
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    record = {"embeddings": "float16", "model_metadata": {"embedding": {"output": "embedding", "dim": DIM,
                                                                        "hash": model_hash}}}
    (folder / "scan.json").write_text(json.dumps(record))
    start = 0
    for number, vectors in enumerate(shards):
        rows = []
        for k, vector in enumerate(vectors):
            bad = errors_every and (start + k) % errors_every == 0
            rows.append({"index": start + k, "path": f"/pool/img{start + k:05d}.jpg", "error": "bad" if bad else None,
                         "embedding": None if bad else vector.astype(np.float16)})
        schema = pa.schema([("index", pa.int64()), ("path", pa.string()), ("error", pa.string()),
                            ("embedding", pa.list_(pa.float16(), DIM))])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "shards" / f"shard-{number:06d}.parquet")
        start += len(vectors)
    return folder


def test_the_plan_follows_pool_size_and_memory_budget():
    assert plan_index(10_000, 176).kind == "flat"
    big = plan_index(1_000_000, 176)
    assert big.kind == "ivf_sq8" and big.lists == 1024 and big.factory() == "IVF1024,SQ8"
    tight = plan_index(10_000_000, 176, 1 * GiB)
    assert tight.kind == "ivf_pq" and 176 % tight.pq_bytes == 0
    assert 10_000_000 * tight.bytes_per_vector * index_module.OVERHEAD <= 1 * GiB
    with pytest.raises(SearchError, match="do not fit"):
        plan_index(10_000_000, 176, 0.05 * GiB)


def test_an_index_grows_with_new_shards_only_and_maps_ids_to_paths(tmp_path):
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(300, DIM)))
    scan = fake_scan(tmp_path / "scan", [vectors[:100], vectors[100:200]], errors_every=7)
    record = build_index([scan], tmp_path / "index", progress=lambda *_: None)
    scored = [k for k in range(200) if k % 7]
    assert record["plan"]["kind"] == "flat" and record["count"] == len(scored)
    fake_scan(tmp_path / "scan", [vectors[:100], vectors[100:200], vectors[200:]], errors_every=7)
    (scan / "shards" / ".tmp-shard-000003.parquet").write_bytes(b"half a shard")  # an interrupted scan's leftover
    grown = build_index([scan], tmp_path / "index", progress=lambda *_: None)
    assert grown["this_build"] == {**grown["this_build"], "shards_added": 1}
    scored = [k for k in range(300) if k % 7]
    index = PoolIndex(tmp_path / "index")
    assert index.count == len(scored)
    similarity, ids = index.search(vectors[[1, 250]], 1)
    assert index.paths(ids[:, 0]) == ["/pool/img00001.jpg", "/pool/img00250.jpg"]
    assert similarity[:, 0] == pytest.approx([1.0, 1.0], abs=2e-3)  # stored as float16
    # A shard rewritten after it was indexed cannot be trusted.
    fake_scan(tmp_path / "scan", [vectors[:50], vectors[100:200], vectors[200:]])
    with pytest.raises(SearchError, match="changed since it was indexed"):
        build_index([scan], tmp_path / "index", progress=lambda *_: None)


def test_growth_past_the_budget_is_refused_and_a_copied_scan_is_indexed_once(tmp_path):
    rng = np.random.default_rng(5)
    scan = fake_scan(tmp_path / "scan", [unit(rng.normal(size=(100, DIM)))])
    (scan / "scan.json").write_text(json.dumps({**json.loads((scan / "scan.json").read_text()),
                                                "source": "/pool", "model_sha256": "f" * 64}))
    budget = 150 * 4 * DIM * index_module.OVERHEAD  # room for 150 float32 vectors
    build_index([scan], tmp_path / "index", budget, progress=lambda *_: None)
    import shutil

    shutil.copytree(scan, tmp_path / "moved")  # the same scan in another folder: the same rows
    again = build_index([scan, tmp_path / "moved"], tmp_path / "index", progress=lambda *_: None)
    assert again["count"] == 100 and again["this_build"]["shards_added"] == 0
    bigger = fake_scan(tmp_path / "more", [unit(rng.normal(size=(100, DIM)))])
    with pytest.raises(SearchError, match="beyond its budget"):
        build_index([bigger], tmp_path / "index", progress=lambda *_: None)
    planned = build_index([bigger], tmp_path / "index2", budget * 100, expected_count=10_000,
                          progress=lambda *_: None)
    assert planned["planned_for"] == 10_000


def test_a_product_quantised_index_stops_probing_where_recall_stops_growing(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    vectors = unit(rng.normal(size=(4000, DIM)))
    monkeypatch.setattr(index_module, "EXACT_UP_TO", 100)
    budget = 4000 * (index_module.ID_BYTES + 4) * index_module.OVERHEAD + 64 * DIM * 4  # 4-byte codes
    record = build_index([fake_scan(tmp_path / "scan", [vectors[:2000], vectors[2000:]])], tmp_path / "index",
                         budget, progress=lambda *_: None)
    plan = record["plan"]
    assert plan["kind"] == "ivf_pq" and plan["pq_bytes"] == 4
    assert plan["nprobe"] < plan["lists"]  # PQ4 caps the recall: probing every list would not reach 0.97
    # A build that stopped between writing the index and its record: the extra vectors are dropped.
    import faiss

    index = faiss.read_index(str(tmp_path / "index" / "vectors.faiss"))
    index.add_with_ids(vectors[:10], np.arange(4000, 4010))
    faiss.write_index(index, str(tmp_path / "index" / "vectors.faiss"))
    assert PoolIndex(tmp_path / "index").count == 4000


def test_an_index_refuses_scans_of_another_model_and_scans_without_embeddings(tmp_path):
    rng = np.random.default_rng(1)
    scan = fake_scan(tmp_path / "a", [unit(rng.normal(size=(20, DIM)))])
    build_index([scan], tmp_path / "index", progress=lambda *_: None)
    other = fake_scan(tmp_path / "b", [unit(rng.normal(size=(20, DIM)))], model_hash="b" * 64)
    with pytest.raises(SearchError, match="another model"):
        build_index([other], tmp_path / "index", progress=lambda *_: None)
    with pytest.raises(SearchError, match="another model"):
        build_index([scan, other], tmp_path / "index2", progress=lambda *_: None)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "scan.json").write_text(json.dumps({"embeddings": None, "model_metadata": {}}))
    with pytest.raises(SearchError, match="--embeddings"):
        build_index([plain], tmp_path / "index3", progress=lambda *_: None)


def test_a_compressed_index_is_trained_on_every_shard_and_finds_the_exact_neighbours(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    centres = unit(rng.normal(size=(40, DIM)))
    vectors = unit(centres[rng.integers(0, 40, 6000)] + 0.3 * rng.normal(size=(6000, DIM)))
    shards = [vectors[k:k + 1000] for k in range(0, 6000, 1000)]
    monkeypatch.setattr(index_module, "EXACT_UP_TO", 1000)
    record = build_index([fake_scan(tmp_path / "scan", shards)], tmp_path / "index", progress=lambda *_: None)
    assert record["plan"]["kind"] == "ivf_sq8"
    index = PoolIndex(tmp_path / "index")
    queries = unit(vectors[rng.choice(6000, 50)] + 0.2 * rng.normal(size=(50, DIM)))  # images like pool images
    _, found = index.search(queries, 10)
    exact = np.argsort(-(queries @ vectors.astype(np.float16).astype(np.float32).T), axis=1)[:, :10]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert recall >= 0.9, recall
    sample = []
    monkeypatch.setattr(index_module, "read_vectors", lambda shard, dim: (sample.append(shard) or
                                                                          (vectors[:1000], ["p"] * 1000)))
    index_module._training_sample(sorted((tmp_path / "scan" / "shards").glob("*.parquet")), DIM, 600)
    assert len(sample) == 6


def test_candidates_fold_copies_and_leave_out_copies_of_seeds(tmp_path):
    rng = np.random.default_rng(3)
    photos = unit(rng.normal(size=(60, DIM)))
    seed = unit(photos[0] + 0.4 * photos[1])
    near = [unit(seed + 0.3 * rng.normal(size=DIM) / np.sqrt(DIM)) for _ in range(3)]  # like the seed, distinct
    copies_of_near = [unit(near[0] + 0.01 * rng.normal(size=DIM)) for _ in range(4)]  # crops of one photograph
    seed_copy = unit(seed + 0.005 * rng.normal(size=DIM))  # the seed itself, re-uploaded
    pool = np.concatenate([photos[2:], near, copies_of_near, [seed_copy]])
    fake_scan(tmp_path / "scan", [pool])
    build_index([tmp_path / "scan"], tmp_path / "index", progress=lambda *_: None)
    index = PoolIndex(tmp_path / "index")
    found = find_candidates(index, seed[None], top=5, copy_similarity=0.99)
    assert len(found.ranked) == 5 and found.searched == 2 * 5 + 50  # the search depth
    assert found.seed_copies == {0: [len(pool) - 1]}
    # The three photographs like the seed come first, the four crops of one folded into whichever ranks best.
    first_three = found.ranked[:3]
    folded = next(c for c in first_three if c.copies)
    assert sorted([folded.id, *folded.copies]) == [58, 61, 62, 63, 64]
    assert {c.id for c in first_three} - {folded.id} == {59, 60}
    assert [c.similarity for c in found.ranked] == sorted((c.similarity for c in found.ranked), reverse=True)
    groups = duplicate_groups(index, 0.99)
    assert [58, 61, 62, 63, 64] in groups and all(len(g) >= 2 for g in groups)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny exported models with different weights, so different embeddings."""
    from waterdrop.config import load_registry
    from waterdrop.data.demo import generate
    from waterdrop.export import export_onnx
    from waterdrop.model.multitask import MultiTaskNet

    folder = tmp_path_factory.mktemp("search_models")
    cfg = load_registry(write_registry(folder / "registry", generate(folder / "data", seed=0, scale=0.005)))
    thresholds = {t.name: 0.5 if t.head_type == "BinaryHead" else dict.fromkeys(t.labels, 0.3) for t in cfg.tasks}
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        files.append(folder / f"model{seed}.onnx")
        export_onnx(MultiTaskNet(cfg).eval(), cfg, thresholds, files[-1])
    return files


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "search_pool.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_scan_embeddings_build_an_index_that_seed_images_query(models, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(4)
    for k in range(16):
        image = np.full((72, 96, 3), rng.integers(0, 256, 3), np.uint8)
        centre, radius = (int(rng.integers(20, 76)), 36), int(rng.integers(5, 30))
        cv2.circle(image, centre, radius, rng.integers(0, 256, 3).tolist(), -1)
        cv2.imwrite(str(pool / f"img{k:02d}.png"), image)
    (pool / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "scan"
    scan_local(models[0], pool, out, batch_size=4, workers=1, threads=1, shard_size=8, embeddings="float16",
               progress=False)
    rows = sorted(pq.read_table(out / "shards").to_pylist(), key=lambda row: row["index"])
    predictor = Predictor(models[0])
    good = [row for row in rows if row["error"] is None]
    assert len(good) == 16 and all(row["embedding"] is None for row in rows if row["error"])
    expected = predictor.embed_images([cv2.cvtColor(cv2.imread(row["path"]), cv2.COLOR_BGR2RGB) for row in good])
    assert np.abs(np.array([row["embedding"] for row in good]) - expected).max() < 2e-3  # float16
    assert pq.read_schema(out / "shards" / "shard-000000.parquet").field("embedding").type == pa.list_(
        pa.float16(), predictor.embedding["dim"])
    with pytest.raises(ScanError, match="embeddings"):  # a resumed scan keeps its columns
        scan_local(models[0], pool, out, shard_size=8, progress=False)
    # The scan as a restarted one leaves it while it runs: scan.json "running", the last shard not
    # written yet. What is there is indexed already.
    from waterdrop.scan.rows import RowBuilder
    from waterdrop.scan.store import ShardStore, scan_spec

    last = out / "shards" / "shard-000002.parquet"
    kept = last.read_bytes()
    last.unlink()
    ShardStore(out, scan_spec(models[0], pool, 8, "float16"), RowBuilder(predictor, "float16").metadata)
    assert json.loads((out / "scan.json").read_text())["status"] == "running"
    partial = _tool("build", out, "--index", tmp_path / "partial")
    assert partial.returncode == 0, partial.stderr
    assert json.loads((tmp_path / "partial" / "index.json").read_text())["count"] == 16 - 1  # shard 2 holds img15 alone
    last.write_bytes(kept)

    built = _tool("build", out, "--index", tmp_path / "index")
    assert built.returncode == 0, built.stderr
    bad_seed = tmp_path / "bad_seed.jpg"
    bad_seed.write_bytes(b"\xff\xd8\xff truncated")
    asked = _tool("query", pool / "img03.png", bad_seed, "--index", tmp_path / "index", "--model", models[0],
                  "--top", "5", "--copy-similarity", "0.9995", "--out", tmp_path / "query")
    assert asked.returncode == 1, asked.stderr  # done, one seed left out and named
    assert "bad_seed.jpg" in asked.stderr
    summary = json.loads((tmp_path / "query" / "summary.json").read_text())
    assert summary["seeds_left_out"][0]["path"].endswith("bad_seed.jpg")
    # The seed is in the pool: its own copy is left out of the candidates, not ranked first.
    assert any(path.endswith("img03.png") for paths in summary["seed_copies_in_pool"].values() for path in paths)
    with open(tmp_path / "query" / "candidates.csv", newline="") as stream:
        listed = list(csv.DictReader(stream))
    assert listed and [int(r["rank"]) for r in listed] == list(range(1, len(listed) + 1))
    assert all(not r["path"].endswith("img03.png") for r in listed)
    assert (tmp_path / "query" / "contact_sheet.png").is_file()
    assert len((tmp_path / "query" / "to_label.jsonl").read_text().splitlines()) == len(listed)

    manifest = tmp_path / "seeds.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"pool/img{k:02d}.png", "labels": [label]}) + "\n"
                                for k, label in ((3, "collage"), (4, "normal"))))
    from_manifest = _tool("query", "--manifest", manifest, "--label", "collage", "--index", tmp_path / "index",
                          "--model", models[0], "--out", tmp_path / "query2")
    assert from_manifest.returncode == 0, from_manifest.stderr
    assert [Path(p).name for p in json.loads((tmp_path / "query2" / "summary.json").read_text())["seeds"]] == [
        "img03.png"]
    refused = _tool("query", pool / "img03.png", "--index", tmp_path / "index", "--model", models[1])
    assert refused.returncode == 2 and "another model" in refused.stderr
    nothing = _tool("query", bad_seed, "--index", tmp_path / "index", "--model", models[0])
    assert nothing.returncode == 2 and "no seed could be decoded" in nothing.stderr
    twins = _tool("dedupe", "--index", tmp_path / "index", "--similarity", "0.999", "--out", tmp_path / "dedupe")
    assert twins.returncode == 0, twins.stderr
    assert json.loads((tmp_path / "dedupe" / "summary.json").read_text())["pool_vectors"] == 16
