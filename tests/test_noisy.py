"""O2U-Net noisy-label ranking: the scores, the schedule, and the tool on planted label errors."""

import csv
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml

from tests.conftest import REPO
from waterdrop.config import load_registry
from waterdrop.curation.noisy import o2u_scores, rank, write_outputs
from waterdrop.curation.outliers import label_outliers, short_run, write_outliers
from waterdrop.curation.sample_losses import Phase, SampleLosses, constant, cyclic, record_sample_losses
from waterdrop.data.dataset import collate
from waterdrop.data.loaders import task_dataset
from waterdrop.kinds import kind_of
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.records import Record


def test_o2u_scores_normalise_each_epoch_then_average():
    losses = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [np.nan, 1.0, 2.0]])
    mean, variance = o2u_scores(losses)
    # epoch means 2, 4, 1.5 -> normalised rows [-1, 0, 1], [-2, 0, 2], [nan, -0.5, 0.5]
    np.testing.assert_allclose(mean, [-1.5, -1 / 6, 7 / 6])
    np.testing.assert_allclose(variance, [0.25, np.var([0, 0, -0.5]), np.var([1, 2, 0.5])])


def test_cyclic_schedule_runs_high_to_low_within_each_cycle():
    schedule = cyclic(1.0, 0.01, cycle_epochs=2)
    assert schedule(0) == 1.0 and schedule(2) == 1.0 and schedule(4.0) == 1.0
    assert schedule(1) == pytest.approx(0.505)
    assert schedule(1.999) == pytest.approx(0.01, abs=1e-3)
    warm = constant(0.1, warmup_epochs=0.5)
    assert warm(0) == pytest.approx(0.001) and warm(0.5) == warm(3) == pytest.approx(0.1)


def test_label_probability_per_kind():
    np.testing.assert_allclose(kind_of("binary").label_probability(np.array([0.9, 0.9]), np.array([1, 0])), [0.9, 0.1])
    scores = np.array([[0.9, 0.2, 0.7], [0.5, 0.5, 0.5]])
    truth = np.array([[1, 0, -1], [-1, -1, -1]])
    fit = kind_of("multilabel").label_probability(scores, truth)
    assert fit[0] == pytest.approx(0.8) and np.isnan(fit[1])
    with pytest.raises(ValueError, match="not 'graded'"):
        kind_of("graded").label_probability(scores, truth)


def _colour_task(root, flip_every=10, bad_files=True):
    """A binary task a tiny network learns in an epoch (red vs blue noise), with every
    ``flip_every``-th training label flipped. Returns the registry and the flipped paths."""
    rng = np.random.default_rng(0)
    lines, flipped = {"train": [], "val": []}, []
    for split, count in (("train", 120), ("val", 24)):
        for i in range(count):
            positive = i % 2 == 0
            image = rng.integers(0, 90, (48, 48, 3), dtype=np.uint8)
            image[..., 2 if positive else 0] += 150  # BGR: red for positives, blue for normals
            path = root / split / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), image)
            label = positive != (split == "train" and i % flip_every == 3)
            if split == "train" and i % flip_every == 3:
                flipped.append(str(path))
            lines[split].append({"image": f"{split}/{path.name}", "labels": ["positive"] if label else []})
    if bad_files:
        (root / "train" / "broken.png").write_bytes(b"not a png")
        lines["train"].append({"image": "train/broken.png", "labels": []})
    for split, entries in lines.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    task = {"name": "colour", "head": {"type": "BinaryHead"}, "labels": ["positive"], "negative_label": "normal",
            "data": {"train": str(root / "train.jsonl"), "val": str(root / "val.jsonl")},
            "augment": {"rotation": 0, "color": 0.0, "erasing": 0.0},
            "deploy": {"prevalence": 0.5, "target": {"recall": 0.9}}}
    registry = yaml.safe_load((REPO / "registry.yaml").read_text())
    registry.update(demo_data=None, tasks=["colour.yaml"])
    registry["model"].update(backbone="test_resnet", pretrained=None, input_size=32)
    registry["train"].update(batch_size=16, num_workers=0)
    registry["train"]["optimizer"]["lr"] = 0.01
    (root / "colour.yaml").write_text(yaml.safe_dump(task))
    (root / "registry.yaml").write_text(yaml.safe_dump(registry))
    return root / "registry.yaml", flipped


def test_batches_carry_the_ids_of_the_images_used(tmp_path):
    registry, _ = _colour_task(tmp_path)
    cfg = load_registry(registry)
    dataset = task_dataset(cfg, MultiTaskNet(cfg), 0, "train", augment=False, substitute=False)
    batch = collate([dataset[5], dataset[120], dataset[7]], cfg.task_names)  # 120 is the broken file
    assert batch["ids"]["colour"].tolist() == [5, 7]
    assert [path for _, path in batch["skipped"]] == [str(tmp_path / "train" / "broken.png")]


def test_recording_sees_every_sample_once_per_epoch_and_leaves_out_undecodable(tmp_path):
    registry, _ = _colour_task(tmp_path)
    cfg = load_registry(registry)
    lrs = []
    recorded = record_sample_losses(MultiTaskNet(cfg), cfg, "colour",
                                    [Phase("normal", 1, lambda done: lrs.append(done) or 1e-3)], printer=lambda m: None)
    assert recorded.losses.shape == (1, 121)
    assert np.isfinite(recorded.losses[0, :120]).all() and np.isnan(recorded.losses[0, 120])
    assert recorded.undecodable == [str(tmp_path / "train" / "broken.png")]
    assert lrs[0] == 0 and all(0 <= x < 1 for x in lrs) and len({round(x, 3) for x in lrs}) >= 8  # per iteration


def test_find_noisy_ranks_planted_label_errors_first(tmp_path):
    registry, flipped = _colour_task(tmp_path)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "find_noisy.py"), str(registry), "--task", "colour", "--out", str(out),
         "--normal-epochs", "2", "--cycles", "2", "--cycle-epochs", "2", "--lr-max", "0.01", "--top", "12",
         "--drop", "0.1"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1, result.stderr  # done, with one undecodable image left out
    assert "1 undecodable image(s) left out" in result.stdout
    with open(out / "colour_ranking.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 120  # the broken file is not ranked
    top = [row["path"] for row in rows[:len(flipped)]]
    precision = len(set(top) & set(flipped)) / len(flipped)
    assert precision >= 0.75, (precision, top)
    # 12 thumbnails of 160 px, 8 to a row, each over a 34 px caption.
    assert cv2.imread(str(out / "colour_top12.png")).shape == (2 * (160 + 34), 8 * 160, 3)
    kept = [json.loads(line)["image"] for line in (out / "colour_cleaned_train.jsonl").read_text().splitlines()]
    assert len(kept) == 121 - 12 and not set(kept) & {row["path"] for row in rows[:12]}
    assert json.loads((out / "colour_summary.json").read_text())["dropped"] == 12


def test_settings_that_make_the_ranking_meaningless_are_refused_or_left_out(tmp_path):
    registry, _ = _colour_task(tmp_path, bad_files=False)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "find_noisy.py"), str(registry), "--task", "colour",
                             "--cycles", "1", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2 and "give at least 2" in result.stderr and not (tmp_path / "out").exists()
    # Without a normal phase (--from), final_normal_loss would be NaN in every row: left out.
    records = [Record(tmp_path / f"{i}.png", ["red"]) for i in range(4)]
    losses = np.array([[0.1, 0.9, 0.3, 0.2], [0.2, 0.8, 0.2, 0.1], [0.1, 0.7, 0.4, 0.3], [0.3, 0.9, 0.1, 0.2]])
    recorded = SampleLosses(records, losses, np.full((4, 4), 0.5), ["cyclic"] * 4, [0.01] * 4)
    files = write_outputs(rank(recorded), tmp_path / "ranked", "colour")
    with open(files["ranking"]) as f:
        header = next(csv.reader(f))
    assert header == ["rank", "path", "labels", "score", "loss_mean", "loss_variance"]
    summary = json.loads(files["summary"].read_text())
    assert summary["columns_left_out"] == ["final_normal_loss", "label_prob_last"]


def test_find_noisy_names_an_unknown_task(tmp_path):
    registry, _ = _colour_task(tmp_path, bad_files=False)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "find_noisy.py"), str(registry), "--task", "nope"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "no task 'nope'" in result.stderr and "colour" in result.stderr


def test_label_outliers_are_the_samples_whose_label_stays_improbable(tmp_path):
    registry, flipped = _colour_task(tmp_path)
    cfg = load_registry(registry)
    torch.manual_seed(0)
    recorded = record_sample_losses(MultiTaskNet(cfg), cfg, "colour", short_run(5, cfg.train.lr),
                                    printer=lambda m: None)
    found = label_outliers(recorded, max_prob=0.3, settle_epochs=2)
    paths = [str(recorded.records[i].path) for i in found]
    assert len(set(paths) & set(flipped)) >= 0.75 * len(flipped) and len(paths) <= 1.5 * len(flipped)
    assert np.all(np.nanmean(recorded.label_prob[2:, found], axis=0) < 0.3)
    files = write_outliers(recorded, found, tmp_path / "out", "colour", top=5)
    assert len(files["outliers"].read_text().splitlines()) == len(found) + 1
    assert cv2.imread(str(files["outlier_sheet"])).shape == (160 + 34, 5 * 160, 3)  # the first 5, in one row
    with pytest.raises(ValueError, match="at least 2 epochs"):
        short_run(1, 0.01)


def test_clean_data_lists_outliers_for_review(tmp_path):
    registry, flipped = _colour_task(tmp_path)
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "clean_data.py"), "--outliers", str(registry), "--task", "colour",
         "--outlier-epochs", "5", "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
        timeout=300)
    assert result.returncode == 1, result.stderr  # one undecodable image
    assert "1 undecodable image(s) left out" in result.stdout
    with open(tmp_path / "out" / "colour_outliers.csv") as f:
        listed = [row["path"] for row in csv.DictReader(f)]
    assert len(set(listed) & set(flipped)) >= 0.75 * len(flipped) and len(listed) <= 1.5 * len(flipped), listed
    assert (tmp_path / "out" / "colour_outliers.png").is_file()


def test_a_multilabel_task_is_recorded_too(registry_file):
    cfg = load_registry(registry_file)
    torch.manual_seed(0)
    recorded = record_sample_losses(MultiTaskNet(cfg), cfg, "scene_tags", [Phase("normal", 1, lambda done: 1e-3)],
                                    printer=lambda m: None)
    # One epoch, every training image once; each has its tags annotated, so each has a fit.
    assert recorded.losses.shape == recorded.label_prob.shape == (1, len(recorded.records))
    assert len(recorded.records) == len(cfg.tasks[2].train.read_text().splitlines())
    fit = recorded.label_prob
    assert np.isfinite(recorded.losses).all() and np.isfinite(fit).all() and ((fit >= 0) & (fit <= 1)).all()
