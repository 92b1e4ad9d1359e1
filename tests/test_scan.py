"""Pool scanner (waterdrop.scan, tools/scan.py): sources, rows, resumption, local and Ray engines."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.conftest import huge_png, write_registry
from waterdrop.scan import RowBuilder, ScanError, scan_local, source_entries
from waterdrop.scan.sources import walk_folder

REPO = Path(__file__).resolve().parents[1]
BAD = {
    "zero.jpg": "empty file",
    "corrupt.jpg": "not an image",
    "truncated.jpg": "corrupt or truncated",
    "huge.png": "over the limit",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny exported model: test_resnet at 64 px, the three demo tasks, loss prediction on scene_tags."""
    from waterdrop.config import load_registry
    from waterdrop.data.demo import generate
    from waterdrop.export import export_onnx
    from waterdrop.model.multitask import MultiTaskNet

    folder = tmp_path_factory.mktemp("scan_model")
    registry = write_registry(folder / "registry", generate(folder / "data", seed=0, scale=0.005))
    task_file = folder / "registry" / "tasks" / "scene_tags.yaml"
    task_file.write_text(yaml.safe_dump({**yaml.safe_load(task_file.read_text()), "loss_prediction": {"hidden": 16}}))
    cfg = load_registry(registry)
    torch.manual_seed(0)
    thresholds = {t.name: 0.5 if t.head_type == "BinaryHead" else dict.fromkeys(t.labels, 0.3) for t in cfg.tasks}
    export_onnx(MultiTaskNet(cfg).eval(), cfg, thresholds, folder / "model.onnx")
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A folder of 12 decodable images of several sizes (two sub-folders), 4 bad ones and a hidden file."""
    folder = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    for k in range(12):
        height, width = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        target = folder / ("a", "b", "")[k % 3] / f"img{k:02d}{('.jpg', '.png')[k % 2]}"
        target.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(target), pixels)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    whole = (folder / "a" / "img00.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    huge_png(folder / "huge.png")
    (folder / ".hidden.jpg").write_bytes(whole)
    (folder / "notes.txt").write_text("not an image suffix: not listed\n")
    return folder


def read_rows(out: Path) -> list[dict]:
    return sorted(pq.read_table(out / "shards").to_pylist(), key=lambda row: row["index"])


def assert_matches_predictor(rows: list[dict], model: Path) -> None:
    """Every scored row holds the runtime's own result for its image (scores to 1e-5)."""
    from waterdrop.runtime import Predictor

    scored = [row for row in rows if row["error"] is None]
    expected = {r["image"]: r["tasks"] for r in Predictor(model).predict_paths([row["path"] for row in scored])}
    for row in scored:
        for task, result in expected[row["path"]].items():
            for key, value in result.items():
                column = f"{task}.{key}"
                if key in ("threshold", "thresholds"):  # the same for every row: in the metadata
                    assert column not in row
                elif key == "objects":
                    found = json.loads(row[column])
                    assert [o["label"] for o in found] == [o["label"] for o in value]
                    for got, want in zip(found, value):
                        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
                        assert got["box"] == pytest.approx(want["box"], abs=1e-2)
                elif isinstance(value, dict):
                    assert row[column] == pytest.approx(list(value.values()), abs=1e-5), column
                elif isinstance(value, float):
                    assert row[column] == pytest.approx(value, abs=1e-5), column
                else:
                    assert row[column] == value, column


def test_local_scan_gives_a_row_per_input_with_errors_and_the_runtime_scores(model, pool, tmp_path):
    out = tmp_path / "scan"
    record = scan_local(model, pool, out, batch_size=3, workers=2, threads=1, shard_size=5, progress=False)
    rows = read_rows(out)
    paths = list(walk_folder(pool))
    assert [row["path"] for row in rows] == paths and [row["index"] for row in rows] == list(range(16))
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"shard-00000{k}.parquet" for k in range(4)]
    errors = {Path(row["path"]).name: row["error"] for row in rows if row["error"]}
    assert set(errors) == set(BAD) and all(BAD[name] in errors[name] for name in BAD)
    assert all(row["disgusting.score"] is None and row["width"] is None for row in rows if row["error"])
    assert_matches_predictor(rows, model)
    assert all(isinstance(row["scene_tags.predicted_loss"], float) for row in rows if row["error"] is None)
    assert "disgusting.predicted_loss" not in rows[0]
    assert record["this_run"]["seen"] == 16 and record["this_run"]["scored"] == 12
    assert record["this_run"]["errors"] == 4 and record["this_run"]["images_per_s"] > 0
    on_disk = json.loads((out / "scan.json").read_text())
    assert on_disk["all_shards"] == {"shards": 4, "rows": 16, "scored": 12, "errors": 4}
    assert on_disk["status"] == "finished" and on_disk["shard_size"] == 5
    assert on_disk["list_labels"]["scene_tags.scores"][0] == "sky"
    metadata = json.loads(pq.read_schema(out / "shards" / "shard-000000.parquet").metadata[b"waterdrop.scan"])
    assert metadata["tasks"]["disgusting"]["threshold"] == 0.5


def test_a_rerun_redoes_only_the_missing_shard_and_refuses_another_spec(model, pool, tmp_path):
    out = tmp_path / "scan"
    scan_local(model, pool, out, batch_size=4, workers=1, threads=1, shard_size=5, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    (out / "shards" / "shard-000002.parquet").unlink()
    (out / "shards" / ".tmp-shard-000002.parquet").write_bytes(b"half a shard from a killed scan")
    record = scan_local(model, pool, out, batch_size=4, workers=1, threads=1, shard_size=5, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert set(after) == set(before)  # the temporary file is gone, the shard is back
    assert {name for name in after if after[name] != before[name]} == {"shard-000002.parquet"}
    assert record["this_run"]["shards_written"] == 1 and record["this_run"]["shards_skipped"] == 3
    assert record["this_run"]["seen"] == 5 and record["all_shards"]["rows"] == 16
    assert [row["index"] for row in read_rows(out)] == list(range(16))
    with pytest.raises(ScanError, match="shard_size"):
        scan_local(model, pool, out, workers=1, shard_size=7, progress=False)


def test_path_list_and_manifest_sources_resolve_relative_paths(model, pool, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    relative = os.path.relpath(pool, lists)
    names = ["a/img00.jpg", "zero.jpg", "missing.jpg", "img02.jpg"]
    (lists / "paths.txt").write_text(
        f"{relative}/{names[0]}\n\n{pool / names[1]}\n{relative}/{names[2]}\n{relative}/{names[3]}\n"
    )
    lines = [json.dumps({"image": f"{relative}/{name}", "label": 1}) for name in names]
    (lists / "pool.jsonl").write_text("\n".join([lines[0], lines[1], "{not json", lines[2], lines[3]]) + "\n")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "scan.py"),
            str(model),
            str(lists / "paths.txt"),
            "--out",
            str(tmp_path / "from_list"),
            "--workers",
            "1",
            "--threads",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr  # done, with two error rows
    assert json.loads(done.stdout.splitlines()[0])["this_run"]["errors"] == 2
    from_list = read_rows(tmp_path / "from_list")
    scan_local(model, lists / "pool.jsonl", tmp_path / "from_manifest", workers=1, threads=1, progress=False)
    from_manifest = read_rows(tmp_path / "from_manifest")
    assert [os.path.realpath(row["path"]) for row in from_list] == [str((pool / n).resolve()) for n in names]
    assert from_manifest[2]["path"].endswith("pool.jsonl:3") and "manifest line 3" in from_manifest[2]["error"]
    assert [row["path"] for row in from_manifest[:2] + from_manifest[3:]] == [row["path"] for row in from_list]
    assert "cannot read" in from_list[2]["error"] and "empty file" in from_list[1]["error"]
    assert_matches_predictor(from_list, model)


def test_sources_refuse_an_image_and_walk_in_a_stable_order(pool):
    with pytest.raises(ValueError, match="is an image"):
        source_entries(pool / "a" / "img00.jpg")
    with pytest.raises(ValueError, match="no such"):
        source_entries(pool / "nowhere")
    walked = [os.path.relpath(path, pool) for path in walk_folder(pool)]
    assert walked[:4] == ["a/img00.jpg", "a/img03.png", "a/img06.jpg", "a/img09.png"]
    assert ".hidden.jpg" not in walked and "notes.txt" not in walked and len(walked) == 16


def test_row_builder_types_every_field_and_keeps_unknown_ones_as_json():
    """A graded task and a field no kind has yet: typed columns, and JSON for the unknown one."""

    class Stub:
        size = 8
        meta = {"input": {"size": 8}, "tasks": [{"name": "sharp", "kind": "graded"}]}

        def predict_batch(self, batch, sizes):
            result = {"grade": "good", "score": 1.5, "above": {"bad": 0.9, "good": 0.6}, "novel": {"x": [1]}}
            return [{"sharp": dict(result)} for _ in sizes]

    builder = RowBuilder(Stub())
    image = np.zeros((8, 8, 3), np.uint8)
    rows = builder.rows([0, 1], ["a.jpg", "b.jpg"], [(image, (20, 10), None), (None, None, "b.jpg: empty file")])
    table = builder.table(rows)
    assert table.column_names[8:] == ["sharp.grade", "sharp.score", "sharp.above", "sharp.novel"]
    first, second = table.to_pylist()
    assert first["sharp.above"] == pytest.approx([0.9, 0.6]) and json.loads(first["sharp.novel"]) == {"x": [1]}
    assert (first["width"], first["height"]) == (20, 10) and second["sharp.grade"] is None
    assert builder.labels == {"sharp.above": ["bad", "good"]}


def test_scan_package_imports_neither_torch_nor_ray():
    code = "import sys, waterdrop.scan; assert not {'torch', 'ray'} & set(sys.modules), 'imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("decode", ["inside", "tasks"])
def test_ray_engine_gives_the_local_engine_rows(model, pool, tmp_path, decode):
    ray = pytest.importorskip("ray")
    from waterdrop.scan import scan_ray

    scan_local(model, pool, tmp_path / "local", batch_size=4, workers=1, threads=1, shard_size=6,
               embeddings="float16", progress=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        if decode == "tasks":
            with pytest.raises(ValueError, match="leave no 1 CPUs"):
                scan_ray(model, pool, tmp_path / "ray", decode="tasks", actors=2, progress=False)
        record = scan_ray(model, pool, tmp_path / "ray", batch_size=4, shard_size=6, window=12,
                          embeddings="float16", decode=decode, progress=False)
    finally:
        ray.shutdown()
    assert record["settings"]["actors"] == (2 if decode == "inside" else 1)
    assert record["settings"]["decode"] == decode and record["this_run"]["shards_written"] == 3
    local, distributed = read_rows(tmp_path / "local"), read_rows(tmp_path / "ray")
    assert sorted(p.name for p in (tmp_path / "ray" / "shards").iterdir()) == sorted(
        p.name for p in (tmp_path / "local" / "shards").iterdir()
    )
    assert [(r["path"], r["error"]) for r in distributed] == [(r["path"], r["error"]) for r in local]
    assert sum(r["embedding"] is not None for r in distributed) == 12
    for got, want in zip(distributed, local):
        for column, value in want.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert got[column] == pytest.approx(value, abs=1e-5), column
            elif column != "scene_tags.objects":
                assert got[column] == value, column


POISON = b"WATERDROP-TEST-POISON"
# Installed in the decoding processes only (through PYTHONPATH): decoding a file that ends with
# the marker kills the process, as a decoder crash or the out-of-memory killer would.
KILLER = f"""
import os, signal
import waterdrop.imageio as imageio

_decode = imageio._decode  # every decode goes through it


def decode(data, source, min_side):
    if bytes(data[-{len(POISON)}:]) == {POISON!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _decode(data, source, min_side)


imageio._decode = decode
"""


def test_a_file_that_kills_its_decoder_gets_an_error_row_and_the_scan_goes_on(model, pool, tmp_path, monkeypatch):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(pool, poisoned)
    victim = sorted(poisoned.glob("a/*.jpg"))[0]
    victim.write_bytes(victim.read_bytes() + POISON)  # still a valid image: decoders ignore trailing bytes
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILLER)
    monkeypatch.setenv("PYTHONPATH", f"{hooks}{os.pathsep}{REPO}")
    record = scan_local(model, poisoned, tmp_path / "out", batch_size=4, workers=2, threads=1, shard_size=6,
                        progress=False)
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 16 and record["this_run"]["seen"] == 16
    killed = [row for row in rows if row["path"] == str(victim)]
    assert len(killed) == 1 and "decoding process died" in killed[0]["error"]
    clean = {row["path"].replace(str(poisoned), str(pool)): row for row in rows if row["path"] != str(victim)}
    monkeypatch.delenv("PYTHONPATH")
    scan_local(model, pool, tmp_path / "reference", batch_size=4, workers=1, threads=1, shard_size=6, progress=False)
    for row in read_rows(tmp_path / "reference"):
        if row["path"] in clean:
            assert (clean[row["path"]]["error"] is None) == (row["error"] is None)
            assert clean[row["path"]]["disgusting.score"] == pytest.approx(row["disgusting.score"], abs=1e-6)


def test_the_ray_engine_isolates_a_file_that_kills_its_decoder(model, pool, tmp_path, monkeypatch, decode="inside"):
    """Decoding inside the actors, the default; a decoding task that dies (``--ray-decode
    tasks``) takes the same way, ``_score_apart``."""
    ray = pytest.importorskip("ray")
    from waterdrop.scan import scan_ray

    poisoned = tmp_path / "poisoned"
    shutil.copytree(pool, poisoned)
    victim = sorted(poisoned.glob("a/*.jpg"))[0]
    victim.write_bytes(victim.read_bytes() + POISON)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILLER)
    monkeypatch.setenv("PYTHONPATH", f"{hooks}{os.pathsep}{REPO}")
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        record = scan_ray(model, poisoned, tmp_path / "out", batch_size=4, shard_size=6, window=12, decode=decode,
                          progress=False)
    finally:
        ray.shutdown()
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 16 and record["all_shards"]["rows"] == 16
    killed = [row for row in rows if row["path"] == str(victim)]
    assert len(killed) == 1 and "died on it" in killed[0]["error"]
    assert sum(row["error"] is None for row in rows) == 16 - len(BAD) - 1


def test_a_scan_runs_through_a_real_two_node_ray_cluster(model, pool, tmp_path):
    """A head and a worker node started with `ray start` as separate processes, as on a cluster
    (one CPU and two: three scoring actors, where a private instance on this 2-core machine
    would start two), and tools/scan.py joining it with --ray-address."""
    pytest.importorskip("ray")
    import secrets
    import socket

    ray_cli = Path(sys.executable).parent / "ray"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Ray's token authentication, as a cluster uses it: every process holds the token.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    common = ["--disable-usage-stats", "--block"]
    # Its own short temporary folder (sockets live there): the cluster's address file stays out of
    # /tmp/ray, where a later ray.init() would find it.
    temp = tempfile.mkdtemp(prefix="wd-ray-", dir="/tmp")
    nodes = [subprocess.Popen([str(ray_cli), "start", "--head", "--port", str(port), "--include-dashboard", "false",
                               "--temp-dir", temp, "--num-cpus", "1", *common], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        nodes.append(subprocess.Popen([str(ray_cli), "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "2",
                                       *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        probe = ("import ray, sys, time; ray.init(address=sys.argv[1], logging_level='ERROR')\n"
                 "for _ in range(120):\n"
                 "    if sum(n['Alive'] for n in ray.nodes()) == 2: break\n"
                 "    time.sleep(0.5)\n"
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        alive = subprocess.run([sys.executable, "-c", probe, f"127.0.0.1:{port}"], env=env, capture_output=True,
                               text=True, timeout=180).stdout.strip()
        assert alive == "2", "the worker node did not join"
        done = subprocess.run([sys.executable, str(REPO / "tools" / "scan.py"), str(model), str(pool), "--out",
                               str(tmp_path / "cluster"), "--engine", "ray", "--ray-address", f"127.0.0.1:{port}",
                               "--batch-size", "4", "--shard-size", "6", "--window", "12", "--quiet"],
                              env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    finally:
        for node in reversed(nodes):
            node.terminate()
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 1, done.stderr  # finished, with the pool's bad files as error rows
    record = json.loads((tmp_path / "cluster" / "scan.json").read_text())
    assert record["settings"]["actors"] == 3 and record["all_shards"]["rows"] == 16
    scan_local(model, pool, tmp_path / "local", batch_size=4, workers=1, threads=1, shard_size=6, progress=False)
    local, cluster = read_rows(tmp_path / "local"), read_rows(tmp_path / "cluster")
    assert [(r["path"], r["error"] is None) for r in cluster] == [(r["path"], r["error"] is None) for r in local]
    for got, want in zip(cluster, local):
        assert got["disgusting.score"] == pytest.approx(want["disgusting.score"], abs=1e-5)


def test_an_incremental_scan_scores_only_new_and_changed_files_and_lists_the_removed(model, pool, tmp_path):
    current = tmp_path / "pool"
    shutil.copytree(pool, current)
    common = {"batch_size": 4, "workers": 1, "threads": 1, "shard_size": 6, "progress": False}
    scan_local(model, current, tmp_path / "day1", **common)
    # A day later: two new images, one changed, one deleted.
    rng = np.random.default_rng(7)
    for k in range(2):
        cv2.imwrite(str(current / f"new{k}.png"), rng.integers(0, 256, (50, 60, 3), dtype=np.uint8))
    changed, deleted = sorted(current.glob("a/*.png"))[0], sorted(current.glob("b/*.jpg"))[0]
    cv2.imwrite(str(changed), rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    deleted.unlink()
    record = scan_local(model, current, tmp_path / "day2", since=[tmp_path / "day1"], **common)
    day2 = read_rows(tmp_path / "day2")
    # Spared: every file as it was but the changed and the deleted one; the bad files' error rows stand.
    assert record["this_run"]["skipped_as_scored_before"] == 16 - 2
    assert {Path(r["path"]).name for r in day2} == {"new0.png", "new1.png", changed.name}
    assert all(r["index"] >= 0 and r["file_bytes"] == Path(r["path"]).stat().st_size for r in day2)
    assert pq.read_table(tmp_path / "day2" / "removed.parquet").column("path").to_pylist() == [str(deleted)]
    assert record["this_run"]["removed_since"] == 1
    again = scan_local(model, current, tmp_path / "day2b", since=[tmp_path / "day1"], retry_errors=True, **common)
    assert again["this_run"]["seen"] == 3 + len(BAD)
    # Together the scans cover the pool: newest row per path, removed paths dropped.
    scan_local(model, current, tmp_path / "full", **common)
    combined = {r["path"]: r for r in read_rows(tmp_path / "day1") if r["path"] != str(deleted)}
    combined.update((r["path"], r) for r in day2)
    full = {r["path"]: r for r in read_rows(tmp_path / "full")}
    assert set(combined) == set(full)
    for path, row in full.items():
        assert (combined[path]["error"] is None) == (row["error"] is None)
        if row["error"] is None:
            assert combined[path]["disgusting.score"] == pytest.approx(row["disgusting.score"], abs=1e-6)
    # Day 3: the deleted file is back as it was, the changed one restored with its old time; each
    # path's newest row decides, so both are scored again, and nothing else.
    day1 = {r["path"]: r for r in read_rows(tmp_path / "day1")}
    shutil.copy(pool / deleted.relative_to(current), deleted)
    os.utime(deleted, ns=(deleted.stat().st_atime_ns, day1[str(deleted)]["mtime_ns"]))
    shutil.copy(pool / changed.relative_to(current), changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, day1[str(changed)]["mtime_ns"]))
    third = scan_local(model, current, tmp_path / "day3", since=[tmp_path / "day2", tmp_path / "day1"], **common)
    assert sorted(Path(r["path"]).name for r in read_rows(tmp_path / "day3")) == sorted([deleted.name, changed.name])
    assert third["this_run"]["removed_since"] == 0
    # A scan stopped and resumed after a file it spared was touched: the later shards stay put.
    stopped = tmp_path / "day4"
    scan_local(model, current, stopped, since=[tmp_path / "day3", tmp_path / "day2", tmp_path / "day1"], **common)
    written = sorted((stopped / "shards").glob("*.parquet"))
    written[-1].unlink()
    toucher = Path(next(p for p in list(walk_folder(current))[:6] if Path(p).name.startswith("img")))  # in shard 0
    os.utime(toucher, ns=(toucher.stat().st_atime_ns, toucher.stat().st_mtime_ns + 10**9))
    resumed = scan_local(model, current, stopped, since=[tmp_path / "day3", tmp_path / "day2", tmp_path / "day1"],
                         **common)
    assert (resumed["this_run"]["shards_written"], resumed["this_run"]["shards_skipped"]) == (1, len(written) - 1)
    # Scores of another model never mix in; scans that cannot tell a changed file are refused.
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "day1", other)
    (other / "scan.json").write_text(json.dumps({**json.loads((other / "scan.json").read_text()),
                                                 "model_sha256": "0" * 64}))
    with pytest.raises(ScanError, match="another model"):
        scan_local(model, current, tmp_path / "day5", since=[other], **common)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "day1", old)
    for shard in (old / "shards").glob("*.parquet"):
        pq.write_table(pq.read_table(shard).drop_columns(["file_bytes", "mtime_ns"]), shard)
    with pytest.raises(ScanError, match="file sizes and times"):
        scan_local(model, current, tmp_path / "day6", since=[old], **common)


def test_a_manifest_with_content_hashes_decides_what_changed_without_looking_at_files(model, pool, tmp_path):
    """The hash a manifest line gives is the file's state: a rewrite of the same size and time is
    told by its new hash, and a file touched but not changed is spared; lines without a hash fall
    back to size and time, and a hash that is not a string is that line's error row."""
    current = tmp_path / "pool"
    shutil.copytree(pool, current)
    images = sorted(p for p in current.rglob("*.png"))[:4]
    manifest = tmp_path / "pool.jsonl"

    def write(hashes: list) -> None:
        lines = [{"image": str(path), **({"content_hash": value} if value is not None else {})}
                 for path, value in zip(images, hashes)]
        manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    common = {"batch_size": 4, "workers": 1, "threads": 1, "shard_size": 6, "progress": False}
    write(["h0", "h1", "h2", None])
    scan_local(model, manifest, tmp_path / "day1", **common)
    day1 = {Path(r["path"]).name: r for r in read_rows(tmp_path / "day1")}
    assert [day1[p.name]["content_hash"] for p in images] == ["h0", "h1", "h2", None]
    assert day1[images[0].name]["file_bytes"] is None and day1[images[3].name]["file_bytes"] is not None
    # images[0]: rewritten, same size and time, new hash; images[1]: touched, same hash;
    # images[3] (no hash): touched, so scored again; images[2]: a hash that is not a string.
    state = images[0].stat()
    images[0].write_bytes(images[0].read_bytes())
    os.utime(images[0], ns=(state.st_atime_ns, state.st_mtime_ns))
    for touched in (images[1], images[3]):
        os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    write(["h0-new", "h1", 7, None])
    record = scan_local(model, manifest, tmp_path / "day2", since=[tmp_path / "day1"], **common)
    day2 = {Path(r["path"]).name: r for r in read_rows(tmp_path / "day2")}
    assert set(day2) == {images[0].name, images[2].name, images[3].name}
    assert record["this_run"]["skipped_as_scored_before"] == 1
    assert "'content_hash' must be a non-empty string, got 7" in day2[images[2].name]["error"]
    assert day2[images[0].name]["content_hash"] == "h0-new" and day2[images[0].name]["error"] is None
    # A hashed line whose file is not there yet gets an error row, and is scored at the next scan
    # once the file is: its error row says nothing of the file as it now is.
    late = current / "late.png"
    images.append(late)
    write(["h0-new", "h1", "h2", None, "h-late"])
    scan_local(model, manifest, tmp_path / "day3", since=[tmp_path / "day2", tmp_path / "day1"], **common)
    day3 = {Path(r["path"]).name: r for r in read_rows(tmp_path / "day3")}
    assert day3["late.png"]["error"] is not None and "late.png" in day3["late.png"]["error"]
    late.write_bytes(images[1].read_bytes())
    scan_local(model, manifest, tmp_path / "day4", since=[tmp_path / "day3", tmp_path / "day2", tmp_path / "day1"],
               **common)
    day4 = {Path(r["path"]).name: r for r in read_rows(tmp_path / "day4")}
    assert day4["late.png"]["error"] is None and day4["late.png"]["content_hash"] == "h-late"


def test_the_progress_line_gives_the_share_done_the_time_left_and_the_errors(capsys, pool):
    from waterdrop.scan.sources import Counter
    from waterdrop.scan.store import Meter

    total = Counter(pool)
    total.join(10)
    assert total.finished and total.count == 16
    meter = Meter(progress=True, every=0.0, total=total)
    meter.skip(6)  # a shard finished by an earlier run
    meter.errors = 2
    meter.tick(5)
    line = capsys.readouterr().err
    assert "5 images, 11 of 16 inputs (69 %)" in line and "s left" in line and "2 errors" in line
    counting = Meter(progress=True, every=0.0, total=type("Unfinished", (), {"count": 7, "finished": False})())
    counting.tick(1)
    assert "counting the source: 7 so far" in capsys.readouterr().err
