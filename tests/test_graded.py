"""A graded quality score (ordered grades) end to end: YAML -> training -> report -> ONNX -> runtime."""

import json

import cv2
import numpy as np
import pytest
import torch
import yaml

from tests.conftest import write_registry
from waterdrop.config import ConfigError, load_registry
from waterdrop.engine.checkpoint import best_checkpoint, load_net
from waterdrop.engine.train import run_training
from waterdrop.export import export_onnx
from waterdrop.kinds import kind_of
from waterdrop.kinds.graded import spearman
from waterdrop.registry import registered_heads
from waterdrop.runtime import Predictor

GRADES = ["blurry", "soft", "sharp"]


def _graded_images(root, per_grade=10, seed=0):
    """Noise textures blurred less for higher grades."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        for grade, sigma in zip(GRADES, (3.0, 1.2, 0.0)):
            folder = root / split / grade
            folder.mkdir(parents=True)
            for i in range(per_grade):
                image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
                if sigma:
                    image = cv2.GaussianBlur(image, (0, 0), sigma)
                cv2.imwrite(str(folder / f"{i}.png"), image)
    return root


def test_graded_head_orders_its_boundaries_and_checks_grades():
    head = registered_heads()["GradedHead"]([8, 16], GRADES, "none")
    target = torch.from_numpy(np.stack([head.encode_target([g], []) for g in GRADES]))
    assert target.tolist() == [0, 1, 2]
    out = head([torch.randn(3, 8, 4, 4), torch.randn(3, 16, 2, 2)])
    assert out["logits"].shape == (3, 2) and head.loss(out, target)["loss_ordinal"].shape == (3,)
    with pytest.raises(ValueError, match="exactly one grade per image"):
        head.encode_target(["soft", "sharp"], [])
    with pytest.raises(ValueError, match="at least two grades"):
        registered_heads()["GradedHead"]([8, 16], ["only"], "none")
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1])) == pytest.approx(0.866, abs=1e-3)


def _train_sharpness(folder, demo_root, data, labels):
    """Two epochs of disgusting and a graded sharpness task whose grades are ``labels`` in
    order; returns the sharpness report and the run folder."""
    registry = write_registry(folder / "reg", demo_root)
    task = {"name": "sharpness", "head": {"type": "GradedHead"}, "labels": labels,
            "data": {split: str(data / split) for split in ("train", "val", "test")}}
    (registry.parent / "tasks" / "sharpness.yaml").write_text(yaml.safe_dump(task))
    text = yaml.safe_load(registry.read_text())
    text["tasks"] = ["tasks/disgusting.yaml", "tasks/sharpness.yaml"]
    text["train"]["epochs"] = 2
    registry.write_text(yaml.safe_dump(text))
    return run_training(registry, folder / "run", printer=lambda *a, **k: None)["sharpness"], folder / "run"


def test_a_graded_task_goes_from_yaml_to_the_runtime(tmp_path, demo_root):
    data = _graded_images(tmp_path / "sharpness")
    report, run = _train_sharpness(tmp_path, demo_root, data, GRADES)
    assert report["kind"] == "graded" and report["split"] == "test" and report["count"] == 30
    assert set(report["boundary_ap"]) == {"above blurry", "above soft"}
    # Learning: the run ranks the test images by their grade, and so does the same run with the
    # grade order reversed (Spearman 0.943 both ways, the most the tied grades allow, at seeds
    # 0-5 and 0-3; chance 0, a constant predictor none). An untrained net already ranks this
    # blur one way (0.47-0.85 at seeds 0-3 with lr ~0), so one order alone would not show it.
    # Two epochs squeeze the expected grades towards the middle: accuracy is the constant
    # predictor's 1/3 and MAE 0.60-0.66 against its 0.67, too close for a floor.
    reversed_report, _ = _train_sharpness(tmp_path / "reversed", demo_root, data, GRADES[::-1])
    assert report["spearman"] >= 0.5 and reversed_report["spearman"] >= 0.5, (report["spearman"],
                                                                              reversed_report["spearman"])
    assert sum(map(sum, report["confusion"]["rows: true grade, columns: predicted"])) == 30
    net, cfg, _ = load_net(best_checkpoint(run))
    thresholds = json.loads((run / "eval" / "thresholds.json").read_text())
    assert thresholds["sharpness"] is None
    parity = export_onnx(net, cfg, thresholds, tmp_path / "model.onnx")
    assert "sharpness.prob" in parity and max(parity.values()) <= 1e-4
    # The runtime's grades and scores on the test split give the report's accuracy and MAE.
    paths = sorted((data / "test").glob("*/*.png"))
    results = list(Predictor(tmp_path / "model.onnx").predict_paths(paths))
    truth = np.array([GRADES.index(path.parent.name) for path in paths])
    graded = [result["tasks"]["sharpness"] for result in results]
    scores = np.array([g["score"] for g in graded])
    assert np.abs(scores - truth).mean() == pytest.approx(report["mae"], abs=1e-3)
    assert np.mean([GRADES.index(g["grade"]) == t for g, t in zip(graded, truth)]) == pytest.approx(report["accuracy"])
    first = graded[paths.index(data / "test" / "sharp" / "0.png")]
    assert first["grade"] in GRADES and 0 <= first["score"] <= 2 and set(first["above"]) == {"blurry", "soft"}
    assert first["score"] == pytest.approx(sum(first["above"].values()), abs=1e-3)
    assert all("positive" in result["tasks"]["disgusting"] for result in results)


def test_graded_report_on_hand_made_scores():
    task = type("Task", (), {"labels": GRADES})()
    truth = np.array([0, 1, 2, 2])
    perfect = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # P(above blurry), P(above soft)
    report = kind_of("graded").report(task, perfect, truth)
    assert report["mae"] == 0 and report["accuracy"] == 1 and report["spearman"] == pytest.approx(1.0)
    assert report["boundary_ap"] == {"above blurry": 1.0, "above soft": 1.0}
    assert report["confusion"]["rows: true grade, columns: predicted"] == [[1, 0, 0], [0, 1, 0], [0, 0, 2]]
    reversed_scores = perfect[::-1].copy()
    worse = kind_of("graded").report(task, reversed_scores, truth)
    assert worse["mae"] == pytest.approx(1.5) and worse["spearman"] < 0 and worse["accuracy"] == 0


def test_graded_tasks_refuse_keys_of_other_kinds(tmp_path, demo_root):
    registry = write_registry(tmp_path, demo_root)
    task = {"name": "sharpness", "head": {"type": "GradedHead"}, "labels": GRADES, "sampler": "balanced",
            "data": {"train": "x", "val": "y"}}
    (registry.parent / "tasks" / "sharpness.yaml").write_text(yaml.safe_dump(task))
    text = yaml.safe_load(registry.read_text())
    text["tasks"].append("tasks/sharpness.yaml")
    registry.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match="'sampler.type': balanced is not for graded tasks; they take: plain"):
        load_registry(registry)
    task.update(sampler="plain", deploy={"target": {"recall": 0.9}})
    (registry.parent / "tasks" / "sharpness.yaml").write_text(yaml.safe_dump(task))
    with pytest.raises(ConfigError, match="'deploy.target': a graded task chooses no threshold"):
        load_registry(registry)
