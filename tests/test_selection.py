"""Active-learning selection: each strategy's order on hand-made scores, and the CLI end to end
on an exported tiny model (torch blocked) and on a checkpoint."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import edit_task, write_registry
from waterdrop.config import config_to_dict, load_registry
from waterdrop.curation.pool_scores import PoolScores, TaskInfo, read_pool
from waterdrop.curation.selection import (
    band_ranking,
    default_band,
    hard_ranking,
    logit,
    loss_ranking,
    select,
    union_ranking,
    write_selection,
)
from waterdrop.export import export_onnx
from waterdrop.model.multitask import MultiTaskNet

REPO = Path(__file__).resolve().parents[1]
TAGS = ["sky", "cloud", "grass", "water", "boat", "tree", "forest", "building", "glasses", "ball"]
THRESHOLDS = {"disgusting": 0.4, "thriller": 0.3, "scene_tags": {t: 0.5 for t in TAGS}}


def _binary(kind="binary", thresholds=(0.5,), has_predicted_loss=True) -> TaskInfo:
    thresholds = None if thresholds is None else np.array(thresholds)
    entry = {"name": "t", "kind": kind, "labels": ["insects", "reptiles"], "negative_label": "normal"}
    return TaskInfo(entry, ["positive"] if kind == "binary" else [], thresholds, has_predicted_loss)


def _tags(labels: list[str]) -> TaskInfo:
    entry = {"name": "tags", "kind": "multilabel", "labels": labels, "negative_label": "none"}
    return TaskInfo(entry, labels, np.full(len(labels), 0.5), True)


def _scores(probs, predicted=None, truth=None) -> PoolScores:
    probs = np.asarray(probs, dtype=float).reshape(len(probs), -1)
    return PoolScores(
        [Path(f"{i}.jpg") for i in range(len(probs))],
        probs,
        None if predicted is None else np.asarray(predicted, dtype=float),
        None if truth is None else np.asarray(truth).reshape(len(probs), -1),
        [],
    )


# --- the strategies on hand-made scores ----------------------------------------------


def test_a_default_band_too_narrow_for_the_budget_widens_in_order_until_it_is_filled(tmp_path):
    # Threshold 0.991 (as on the demo): its default band [0.974, 0.997] holds two of these images.
    probs = [0.999, 0.98, 0.5, 0.995, 0.9, 0.2, 0.999999, 0.97]
    task = _binary(thresholds=(0.991,), has_predicted_loss=False)
    selection = select(_scores(probs), task, budget=5, strategy="band")
    distance = np.abs(logit(np.array(probs)) - logit(0.991))
    assert [i for i, _, _ in selection.selected] == np.argsort(distance, kind="stable")[:5].tolist()
    assert selection.widened_to_odds == pytest.approx(np.exp(np.sort(distance)[4]))
    assert "held 2 image(s); widened" in selection.notes[0]
    summary = write_selection(tmp_path, _scores(probs), task, selection)
    assert summary["selected"] == summary["budget"] == 5 and summary["notes"] == selection.notes
    with open(tmp_path / "selected.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["in_band"] for r in rows] == ["True", "True", "False", "False", "False"]
    assert "score" not in rows[0] and all(float(r["threshold"]) == 0.991 for r in rows)
    # A band the user gave is kept; the note says why the budget is not filled.
    given = select(_scores(probs), task, budget=5, strategy="band", low=0.98, high=0.999)
    assert len(given.selected) == 3 and "the band given (--low/--high) holds 3" in given.notes[0]
    # Labeled recalls: only the confidently wrong are listed, and the note says so.
    truth = [1, 1, 0, 1, 1, 0, 1, 1]  # positives under the band: 0.9 and 0.97
    recalls = select(_scores(probs, truth=truth), task, budget=5, strategy="band")
    assert [i for i, _, _ in recalls.selected] == [4, 7] and "only 2 labeled image(s)" in recalls.notes[0]



def test_default_band_keeps_odds_within_a_factor_of_three_of_the_threshold():
    low, high = default_band(np.array([0.5, 0.9]))
    np.testing.assert_allclose(low, [0.25, 0.75])
    np.testing.assert_allclose(high, [0.75, 27 / 28])


def test_band_keeps_in_band_images_closest_to_the_threshold_first():
    probs = np.array([[0.5], [0.3], [0.9], [0.6], [0.27], [0.1], [0.74]])
    ranking = band_ranking(probs, np.array([0.5]), *default_band(np.array([0.5])))
    # in band: 0.5 (distance 0), 0.6 (0.405), 0.3 (0.847), 0.74 (1.046), 0.27 (0.995); out: 0.9, 0.1
    assert ranking.order.tolist() == [0, 3, 1, 4, 6]
    np.testing.assert_allclose(ranking.scores, np.abs(logit(probs[[0, 3, 1, 4, 6], 0])))
    assert ranking.tags.tolist() == [0] * 5 and ranking.strategy == "band"


def test_multilabel_band_is_decided_by_the_most_uncertain_tag():
    thresholds = np.array([0.5, 0.8])
    probs = np.array(
        [
            [0.45, 0.99],  # tag 0 in band, 0.2 log-odds away; tag 1 out
            [0.05, 0.78],  # tag 1 in band, 0.12 away
            [0.01, 0.999],  # nothing in band
            [0.6, 0.75],  # both in band: tag 0 is 0.41 away, tag 1 0.29
        ]
    )
    ranking = band_ranking(probs, thresholds, *default_band(thresholds))
    assert ranking.order.tolist() == [1, 0, 3] and ranking.tags.tolist() == [1, 0, 1]


def test_hard_recalls_are_confidently_wrong_labels_most_wrong_first():
    truth = np.array([[1], [1], [0], [0], [1]])
    probs = np.array([[0.1], [0.4], [0.95], [0.6], [0.8]])
    ranking = hard_ranking(probs, truth, np.array([0.5]), 0.25, 0.75)
    # positive at 0.1 (2.20 log-odds below), negative at 0.95 (2.94 above); 0.4 and 0.6 are
    # wrong but inside the band, 0.8 is a right positive
    assert ranking.order.tolist() == [2, 0] and ranking.strategy == "hard"
    tags = hard_ranking(np.array([[0.99, 0.1, 0.9]]), np.array([[-1, 1, 1]]), np.array([0.5] * 3), 0.25, 0.75)
    assert tags.order.tolist() == [0] and tags.tags.tolist() == [1]  # the unknown tag 0 is left out


def test_predicted_loss_ranks_every_image_highest_first():
    ranking = loss_ranking(np.array([0.1, 2.0, -1.0, 0.5, 2.0]))
    assert ranking.order.tolist() == [1, 4, 3, 0, 2]  # ties keep pool order
    assert ranking.strategy == "predicted_loss" and ranking.tags.tolist() == [-1] * 5


def test_union_interleaves_skips_duplicates_and_stops_at_the_budget():
    band = band_ranking(np.array([[0.9], [0.6], [0.7], [0.5], [0.05]]), np.array([0.5]), 0.25, 0.75)
    assert band.order.tolist() == [3, 1, 2]
    loss = loss_ranking(np.array([5.0, 9.0, 0.0, 1.0, 4.0]))
    assert loss.order.tolist() == [1, 0, 4, 3, 2]
    picked = union_ranking([band, loss], budget=4)
    assert [(i, r.strategy, p) for i, r, p in picked] == [
        (3, "band", 0),
        (1, "predicted_loss", 0),
        (0, "predicted_loss", 1),
        (2, "band", 2),
    ]
    assert [i for i, _, _ in union_ranking([band, loss], budget=10)] == [3, 1, 0, 2, 4]


def test_select_resolves_the_strategy_and_says_what_is_missing():
    scores = _scores([[0.5], [0.9], [0.45]], predicted=[1.0, 3.0, 2.0])
    chosen = select(scores, _binary(), budget=2)
    assert [r.strategy for r in chosen.rankings] == ["band", "predicted_loss"]
    assert [i for i, _, _ in chosen.selected] == [0, 1]
    assert [r.strategy for r in select(scores, _binary(has_predicted_loss=False), 2).rankings] == ["band"]
    with pytest.raises(ValueError, match="set loss_prediction in the task YAML.*retrain"):
        select(scores, _binary(has_predicted_loss=False), 2, "loss")
    with pytest.raises(ValueError, match="graded: it chooses no threshold.*--strategy loss"):
        select(scores, _binary(kind="graded", thresholds=None), 2, "band")
    assert [r.strategy for r in select(scores, _binary(kind="graded", thresholds=None), 2).rankings] == [
        "predicted_loss"
    ]
    with pytest.raises(ValueError, match="no threshold recorded.*--threshold"):
        select(scores, _binary(thresholds=None), 2, "band")
    # The default band around 0.9 ([0.75, 0.964]) holds one image; it widens to fill the budget of 2.
    widened = select(scores, _binary(thresholds=None), 2, "band", threshold=0.9)
    assert widened.rankings[0].order.tolist() == [1, 0, 2] and [i for i, _, _ in widened.selected] == [1, 0]
    assert "held 1 image(s); widened" in widened.notes[0]
    with pytest.raises(ValueError, match="low < high"):
        select(scores, _binary(), 2, "band", low=0.6, high=0.4)
    with pytest.raises(ValueError, match="budget"):
        select(scores, _binary(), 0)
    labeled = select(_scores([[0.1], [0.9]], [1.0, 2.0], truth=[[1], [1]]), _binary(), 5)
    assert [r.strategy for r in labeled.rankings] == ["hard", "predicted_loss"]


def test_written_rankings_selection_and_undecodable_list(tmp_path):
    scores = _scores([[0.5, 0.1], [0.9, 0.6], [0.3, 0.99]], predicted=[0.2, 0.1, 0.3])
    scores.undecodable = [("bad.jpg", "bad.jpg: empty file")]
    task = _tags(["sky", "boat"])
    summary = write_selection(tmp_path, scores, task, select(scores, task, budget=2), "pool/")
    with open(tmp_path / "band.csv") as f:
        band = list(csv.DictReader(f))
    assert [(r["path"], r["label"], r["prob"]) for r in band] == [
        ("0.jpg", "sky", "0.5"),
        ("1.jpg", "boat", "0.6"),
        ("2.jpg", "sky", "0.3"),
    ]
    with open(tmp_path / "selected.csv") as f:
        selected = list(csv.DictReader(f))
    assert [(r["path"], r["picked_by"], r["rank_there"]) for r in selected] == [
        ("0.jpg", "band", "1"),
        ("2.jpg", "predicted_loss", "1"),
    ]
    assert (tmp_path / "undecodable.txt").read_text() == "bad.jpg\tbad.jpg: empty file\n"
    assert summary["undecodable"] == 1 and summary["rankings"] == {"band": 3, "predicted_loss": 3}
    assert json.loads((tmp_path / "summary.json").read_text())["band_low"] == [0.25, 0.25]


def test_labeled_manifest_truth_and_its_errors(tmp_path):
    manifest = tmp_path / "recalls.jsonl"
    manifest.write_text(
        '{"image": "a.jpg", "labels": ["insects"]}\n{"image": "b.jpg", "labels": []}\n\n'
        '{"image": "c.jpg", "labels": ["normal"]}\n'
    )
    task = _binary()
    paths, truth = read_pool(manifest, task)
    assert [p.name for p in paths] == ["a.jpg", "b.jpg", "c.jpg"] and truth[:, 0].tolist() == [1, 0, 0]
    manifest.write_text('{"image": "a.jpg", "labels": ["sky"], "missing": ["boat"]}\n')
    assert read_pool(manifest, _tags(["sky", "boat", "tree"]))[1].tolist() == [[1, -1, 0]]
    manifest.write_text('{"image": "a.jpg", "labels": ["insects"]}\n{"image": "b.jpg", "labels": ["zebra"]}\n')
    with pytest.raises(ValueError, match=r"recalls.jsonl: image 2 \(.*b.jpg\): unknown label 'zebra'"):
        read_pool(manifest, task)


# --- the command line on a tiny exported model -----------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, demo_root):
    folder = tmp_path_factory.mktemp("selection")
    registry = write_registry(folder, demo_root)
    edit_task(registry, "disgusting", loss_prediction={"hidden": 16})
    edit_task(registry, "scene_tags", loss_prediction={"hidden": 16})
    cfg = load_registry(registry)
    torch.manual_seed(0)
    net = MultiTaskNet(cfg).eval()
    export_onnx(net, cfg, THRESHOLDS, folder / "model.onnx")
    checkpoint = folder / "best_epoch_1.pth"
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "meta": {"waterdrop": {"config": config_to_dict(cfg), "thresholds": THRESHOLDS}},
        },
        checkpoint,
    )
    pool = folder / "pool"
    shutil.copytree(demo_root / "disgusting" / "val", pool)
    (pool / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return folder / "model.onnx", checkpoint, pool


def _select(*args, torch_blocked_in=None):
    env = None
    if torch_blocked_in is not None:
        blocker = torch_blocked_in / "blocker"
        blocker.mkdir(exist_ok=True)
        (blocker / "sitecustomize.py").write_text(
            "import sys\n"
            "class _NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch is blocked in this test')\n"
            "sys.meta_path.insert(0, _NoTorch())\n"
        )
        env = {"PYTHONPATH": f"{blocker}:{REPO}", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "select_for_labeling.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_on_an_onnx_file_runs_without_torch(tiny_model, tmp_path):
    model, _, pool = tiny_model
    out = tmp_path / "out"
    done = _select(
        model,
        pool,
        "--budget",
        5,
        "--task",
        "disgusting",
        "--out",
        out,
        "--low",
        0,
        "--high",
        1,
        torch_blocked_in=tmp_path,
    )
    assert done.returncode == 1, done.stderr  # done, with one undecodable image (counted)
    assert "1 undecodable" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    images = len(list(pool.glob("*.jpg"))) - 1
    assert summary["scored"] == images and summary["undecodable_images"] == [str(pool / "broken.jpg")]
    band, loss, selected = (_rows(out / f"{name}.csv") for name in ("band", "predicted_loss", "selected"))
    assert len(band) == len(loss) == images  # the band [0, 1] holds every image
    distance = [abs(logit(float(r["prob"])) - logit(0.4)) for r in band]
    logodds = [float(r["logodds_from_threshold"]) for r in band]
    assert distance == sorted(distance) and logodds == pytest.approx(distance, abs=1e-5)
    assert all(r["threshold"] == "0.4" and r["in_band"] == "True" for r in band)
    predicted = [float(r["predicted_loss"]) for r in loss]
    assert predicted == sorted(predicted, reverse=True)
    expected = []
    for pair in zip(band, loss):
        for row in pair:
            expected += [] if row["path"] in expected else [row["path"]]
    assert [r["path"] for r in selected] == expected[:5]
    # The checkpoint scored by PyTorch gives the same scores.
    done = _select(
        tiny_model[1], pool, "--budget", 5, "--task", "disgusting", "--out", tmp_path / "torch", "--low", 0, "--high", 1
    )
    assert done.returncode == 1, done.stderr
    by_path = {r["path"]: r for r in _rows(tmp_path / "torch" / "predicted_loss.csv")}
    for row in loss:
        for key in ("prob", "predicted_loss"):
            assert float(by_path[row["path"]][key]) == pytest.approx(float(row[key]), abs=1e-4)


def test_cli_on_labeled_recalls_and_a_multilabel_task(tiny_model, demo_root, tmp_path):
    model, _, _ = tiny_model
    done = _select(
        model,
        demo_root / "disgusting" / "val.jsonl",
        "--budget",
        3,
        "--task",
        "disgusting",
        "--out",
        tmp_path / "recalls",
        "--threshold",
        0.5,
        "--low",
        0.45,
        "--high",
        0.55,
    )
    assert done.returncode == 0, done.stderr
    hard = _rows(tmp_path / "recalls" / "hard.csv")
    for row in hard:
        assert (row["truth"] == "1" and float(row["prob"]) < 0.45) or (
            row["truth"] == "0" and float(row["prob"]) > 0.55
        )
    # Every confidently wrong image is listed: truth from the manifest, scores of all 32 images.
    manifest = [json.loads(line) for line in (demo_root / "disgusting" / "val.jsonl").read_text().splitlines()]
    positive = {str(demo_root / "disgusting" / item["image"]): item["labels"] != ["normal"] for item in manifest}
    scored = {r["path"]: float(r["prob"]) for r in _rows(tmp_path / "recalls" / "predicted_loss.csv")}
    assert set(scored) == set(positive)
    wrong = {path for path, prob in scored.items() if (prob < 0.45 if positive[path] else prob > 0.55)}
    assert wrong and {row["path"] for row in hard} == wrong and len(hard) == len(wrong)
    done = _select(
        model, demo_root / "scene_tags" / "val", "--budget", 4, "--task", "scene_tags", "--out", tmp_path / "tags"
    )
    assert done.returncode == 0, done.stderr
    assert all(r["label"] in TAGS for r in _rows(tmp_path / "tags" / "band.csv"))
    assert len(_rows(tmp_path / "tags" / "selected.csv")) == 4


def test_cli_refuses_what_the_model_cannot_do(tiny_model, demo_root, tmp_path):
    model, _, pool = tiny_model
    done = _select(model, pool, "--budget", 3, "--task", "thriller", "--strategy", "loss")
    assert done.returncode == 2 and "set loss_prediction in the task YAML" in done.stderr
    done = _select(model, pool, "--budget", 3)
    assert done.returncode == 2 and "choose one with --task" in done.stderr
