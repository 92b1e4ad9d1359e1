"""Scene tags: relation graph, repeat-factor sampling, focal loss, per-label targets."""

import random

import numpy as np
import pytest
import torch

from tests.conftest import edit_task
from waterdrop import detection
from waterdrop.config import AugmentConfig, ConfigError, load_registry
from waterdrop.data.dataset import EvalTransform, TrainTransform, crop_boxes, rotate_boxes, rotation_matrix
from waterdrop.data.loaders import build_datasets
from waterdrop.data.sampler import RepeatFactorStream, repeat_factors
from waterdrop.detection import detection_ap, nms
from waterdrop.engine.train import build_runner
from waterdrop.evaluation.metrics import multilabel_report
from waterdrop.features.detector import BoxEncoder
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.model.ssd import SSDHead
from waterdrop.records import DataError
from waterdrop.registry import registered_heads
from waterdrop.relations import RelationError, RelationGraph

LABELS = ["tree", "forest", "pine", "water", "grass", "boat"]


def test_implies_is_transitive_and_excludes_keeps_the_higher_score():
    graph = RelationGraph(LABELS, {"pine": ["forest"], "forest": ["tree"], "boat": ["water"]}, [["water", "grass"]])
    assert graph.closure["pine"] == {"forest", "tree"}
    scores = np.array([[0.1, 0.2, 0.9, 0.3, 0.8, 0.7],    # pine -> forest -> tree; boat (0.7) vs grass (0.8)
                       [0.1, 0.1, 0.1, 0.95, 0.6, 0.1]])  # water beats grass
    decided = scores >= 0.5
    after = graph.apply(scores, decided)
    # row 0: boat implies water, which then competes with grass at boat's 0.7 and loses; boat goes too
    assert [label for label, keep in zip(LABELS, after[0]) if keep] == ["tree", "forest", "pine", "grass"]
    assert [label for label, keep in zip(LABELS, after[1]) if keep] == ["water"]


@pytest.mark.parametrize(
    ("implies", "excludes", "words"),
    [
        ({"forest": ["trees"]}, [], "unknown label 'trees'"),
        ({"tree": ["forest"], "forest": ["pine"], "pine": ["tree"]}, [], "implies-cycle: "),
        ({"forest": ["tree"]}, [["forest", "tree"]], "contradiction: forest implies tree"),
        ({"boat": ["water"], "pine": ["forest"]}, [["water", "grass", "water"]], "two or more different labels"),
        ({}, [["sea", "grass"]], "excludes: unknown label 'sea'"),
    ],
)
def test_bad_relation_graphs_are_refused(implies, excludes, words):
    with pytest.raises(RelationError, match=words):
        RelationGraph(LABELS, implies, excludes)


def test_relation_errors_in_yaml_name_the_file(registry_file):
    relations = registry_file.parent / "tasks" / "scene_tags_relations.yaml"
    relations.write_text("implies: {forest: [tree], tree: [forest]}\n")
    with pytest.raises(ConfigError, match="scene_tags_relations.yaml.*implies-cycle: "):
        load_registry(registry_file)
    relations.write_text("implies: {forest: [tree]}\nexclude: []\n")
    with pytest.raises(ConfigError, match="key 'exclude': unknown key"):
        load_registry(registry_file)


def test_label_parents_become_implications(registry_file):
    labels = ["sky", "cloud", "grass", "water", "boat", "tree", {"name": "forest", "parent": "tree"}, "building",
              "glasses", "ball"]
    edit_task(registry_file, "scene_tags", labels=labels, relations=None)
    task = load_registry(registry_file).tasks[-1]
    assert task.labels[6] == "forest" and task.relations.closure["forest"] == {"tree"}


def test_repeat_factors_follow_the_lvis_rule():
    # label 0 on every image, label 1 on 1 of 100 images
    label_sets = [[0]] * 99 + [[0, 1]]
    factors = repeat_factors(label_sets, 2, threshold=0.1, function="sqrt")
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(np.sqrt(0.1 / 0.01))
    linear = repeat_factors(label_sets, 2, threshold=0.1, function="uniform")
    assert linear[-1] == pytest.approx(10.0)
    stream = RepeatFactorStream(np.array([1.0, 2.5]), np.random.default_rng(0))
    taken = np.array(stream.take(3500 * 10))
    assert (taken == 1).sum() / (taken == 0).sum() == pytest.approx(2.5, rel=0.03)  # stochastic rounding


def test_focal_multilabel_loss_down_weights_easy_negatives():
    head_class = registered_heads()["MultiLabelHead"]
    bce, focal = (head_class([8], ["a", "b"], "none", loss=loss) for loss in ("bce", "focal"))
    outputs = {"logits": torch.tensor([[-4.0, 0.0]])}  # an easy negative and an uncertain one
    target = torch.tensor([[0.0, 0.0]])
    ratio = focal.loss(outputs, target)["loss_cls"] / bce.loss(outputs, target)["loss_cls"]
    assert ratio < 0.3
    with pytest.raises(ValueError, match="bce or focal"):
        head_class([8], ["a"], "none", loss="hinge")


def test_per_label_target_overrides_and_fallback_report():
    rng = np.random.default_rng(0)
    truth = np.stack([rng.integers(0, 2, 200), np.r_[np.ones(3), np.zeros(197)]], 1)
    scores = np.clip(truth * 0.4 + rng.random((200, 2)) * 0.6, 0, 1)
    report = multilabel_report(scores, truth, ["common", "rare"], "precision", 0.9,
                               label_targets={"common": ("recall", 0.8)})
    assert report["labels"]["common"]["target"] == {"recall": 0.8}
    assert report["labels"]["common"]["recall"] >= 0.8
    assert report["fallback_labels"] == ["rare"] and report["thresholds"]["rare"] == 0.5


def test_unknown_label_in_label_targets_is_a_config_error(registry_file):
    edit_task(registry_file, "scene_tags", deploy={"label_targets": {"glases": {"recall": 0.7}}})
    with pytest.raises(ConfigError, match="deploy.label_targets.glases': unknown label"):
        load_registry(registry_file)


def test_relation_graph_changes_f1_in_the_report():
    graph = RelationGraph(["forest", "tree"], {"forest": ["tree"]})
    truth = np.array([[1, 1], [1, 1], [0, 0], [0, 1]])
    scores = np.array([[0.9, 0.2], [0.8, 0.3], [0.1, 0.1], [0.2, 0.9]])
    report = multilabel_report(scores, truth, ["forest", "tree"], "precision", 0.5, graph=graph)
    assert report["micro_after_relations"]["recall"] > report["micro"]["recall"]


# --- small-object detector -----------------------------------------------------------


def test_nms_and_detection_ap_on_hand_made_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=float)
    assert nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    truth = [[(0, np.array([0, 0, 10, 10.0]))], [(0, np.array([20, 20, 30, 30.0]))]]
    detections = [[(0, 0.9, np.array([0, 0, 10, 10.0])), (0, 0.8, np.array([50, 50, 60, 60.0]))],
                  [(0, 0.6, np.array([21, 21, 30, 30.0]))]]
    # ranked: hit (P 1, R .5), miss, hit (P 2/3, R 1) -> AP = .5 * 1 + .5 * 2/3
    assert detection_ap(detections, truth, 2)[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert np.isnan(detection_ap(detections, truth, 2)[1])


def test_ssd_anchors_encoding_round_trip_and_matching():
    ssd = SSDHead([8, 16], num_classes=2)
    feats = [torch.zeros(2, 8, 8, 8), torch.zeros(2, 16, 4, 4)]
    outputs = ssd(feats)
    assert outputs["anchors"].shape == ((64 + 16) * 4, 4) and outputs["det_logits"].shape == (2, 320, 3)
    gt = torch.tensor([[0.1, 0.2, 0.3, 0.3]])
    anchors = outputs["anchors"][:1].expand(1, 4)
    decoded = SSDHead.decode(ssd._encode(gt, anchors)[None], anchors)[0]
    torch.testing.assert_close(decoded, gt)
    boxes = torch.full((2, 3, 5), -1.0)
    boxes[0, 0] = torch.tensor([1, 0.40, 0.40, 0.52, 0.50])  # one small object in image 0, none in image 1
    per_image = ssd.loss(outputs, boxes)
    assert per_image.shape == (2,) and torch.isfinite(per_image).all() and per_image[0] > per_image[1] > 0


def test_box_transforms_follow_the_image():
    boxes = np.array([[10.0, 20.0, 30.0, 40.0]])
    image = np.zeros((100, 200, 3), np.uint8)
    _, scaled, kept = EvalTransform(50)(image, boxes)
    np.testing.assert_allclose(scaled, [[2.5, 10, 7.5, 20]])
    assert kept.tolist() == [0]
    # the first box lies inside the crop; the second keeps 25 of its 400 pixels and is dropped
    cropped, kept = crop_boxes(np.array([[10.0, 10, 20, 20], [90, 90, 110, 110]]), 5, 5, 90, 90)
    assert kept.tolist() == [0] and cropped.tolist() == [[5, 5, 15, 15]]
    flip = TrainTransform(100, AugmentConfig(crop_scale=(1.0, 1.0), hflip=True))
    square = np.zeros((100, 100, 3), np.uint8)
    square[20:40, 10:30] = 255
    for seed in range(6):
        random.seed(seed)
        out, moved, _ = flip(square, boxes)
        x1, y1, x2, y2 = np.round(moved[0]).astype(int)
        assert out[y1 + 2:y2 - 2, x1 + 2:x2 - 2].min() == 255  # the box still covers the object
    rotated = rotate_boxes(boxes, rotation_matrix(100, 100, 0.0), 100)
    np.testing.assert_allclose(rotated, boxes)


def test_bad_boxes_in_a_manifest_name_the_line(registry_file, copy_demo):
    root = copy_demo()
    manifest = root / "scene_tags" / "train.jsonl"
    lines = manifest.read_text().splitlines()
    lines[1] = '{"image": "train/00001.jpg", "labels": ["ball"], "boxes": [{"label": "ball", "box": [5, 5, 2, 9]}]}'
    manifest.write_text("\n".join(lines) + "\n")
    edit_task(registry_file, "scene_tags", data={"train": str(manifest), "val": str(manifest)})
    cfg = load_registry(registry_file)
    with pytest.raises(DataError, match="train.jsonl: line 2: bad box"):
        build_datasets(cfg, MultiTaskNet(cfg), "train")


@pytest.mark.parametrize(("detector", "key", "message"), [
    ({"classes": ["cat"]}, "detector.classes", "non-empty list of this task's labels"),
    ({"classes": ["ball"], "fusion": "vote"}, "detector.fusion", "one of max, mean, none"),
    ({"classes": ["ball"], "levels": []}, "detector.levels", "a non-empty list of feature levels"),
    ({"classes": ["ball"], "max_boxes": 0}, "detector.max_boxes", ">= 1"),
    ({"classes": ["ball"], "nms": 0.5}, "detector.nms", "unknown key"),
])
def test_detector_settings_are_checked(registry_file, detector, key, message):
    edit_task(registry_file, "scene_tags", detector=detector)
    with pytest.raises(ConfigError, match=f"scene_tags.yaml: key '{key}'.*{message}"):
        load_registry(registry_file)


def test_detector_levels_the_trunk_lacks_are_refused_when_the_model_is_built(registry_file):
    edit_task(registry_file, "scene_tags", detector={"classes": ["ball"], "levels": [7]})
    with pytest.raises(ConfigError, match="scene_tags.yaml: key 'detector.levels': got \\[7\\].*levels in 0..4"):
        MultiTaskNet(load_registry(registry_file))


def test_detector_needs_a_multilabel_head_without_cutmix_and_left_the_head(registry_file):
    edit_task(registry_file, "scene_tags", augment={"cutmix": 0.5})
    with pytest.raises(ConfigError, match="cutmix cannot be used with a detector"):
        load_registry(registry_file)
    edit_task(registry_file, "scene_tags", augment={"cutmix": 0.0}, head={"detector": {"classes": ["ball"]}})
    with pytest.raises(ConfigError, match="key 'head.detector'.*move 'detector:' out of 'head:'"):
        load_registry(registry_file)
    edit_task(registry_file, "scene_tags", head={"detector": None})
    edit_task(registry_file, "disgusting", detector={"classes": ["insects"]})
    with pytest.raises(ConfigError, match="disgusting.yaml: key 'detector': needs a multi-label head"):
        load_registry(registry_file)


def test_an_unannotated_tag_does_not_teach_its_detector_class_background(registry_file):
    edit_task(registry_file, "scene_tags", detector={"classes": ["glasses", "ball"], "levels": [1, 2]})
    net = MultiTaskNet(load_registry(registry_file))
    head, detector = net.heads["scene_tags"], net.features["detector"]
    feats = [torch.randn(2, c, 4, 4) for c in net.channels]
    # Image 0 has "glasses" missing (not annotated) and no boxes; image 1 is fully annotated, no objects.
    target = torch.from_numpy(np.stack([head.encode_target([], ["glasses"]), head.encode_target([], [])]))
    encode = BoxEncoder(["glasses", "ball"], 10)
    boxes = torch.from_numpy(np.stack([encode([], np.zeros((0, 4)))] * 2))
    outputs = net.task_outputs("scene_tags", feats, torch.zeros(2, 3, 64, 64))
    outputs["det_logits"].retain_grad()
    detector.sample_terms("scene_tags", outputs, target, {"boxes": boxes})["loss_det"].sum().backward()
    grad = outputs["det_logits"].grad
    assert grad[0, :, 1].abs().max() == 0  # class "glasses" (logit 1 after background) of image 0: untouched
    assert grad[0, :, 2].abs().max() > 0 and grad[1, :, 1].abs().max() > 0


def test_boxes_beyond_max_boxes_are_counted_and_reported(registry_file, tmp_path):
    encode = BoxEncoder(["a", "b"], 2)
    assert encode.beyond_limit(["a", "b", "a", "c"]) == 1 and encode.beyond_limit(["a", "c"]) == 0
    assert encode(["c", "a", "b", "a"], np.array([[0, 0, 1, 1], [0.1, 0.1, 0.2, 0.2], [0, 0, 0.5, 0.5],
                                                  [0.3, 0.3, 0.4, 0.4]])).ravel().tolist() == pytest.approx(
        [0, 0.1, 0.1, 0.2, 0.2, 1, 0, 0, 0.5, 0.5])
    edit_task(registry_file, "scene_tags", detector={"classes": ["glasses", "ball"], "max_boxes": 1})
    cfg = load_registry(registry_file)
    dataset = build_datasets(cfg, MultiTaskNet(cfg), "train").datasets[2]
    expected = sum(max(0, len(classes) - 1) for classes, _ in dataset.boxes)
    assert expected > 0 and dataset.boxes_left_out == expected
    printed = []
    build_runner(cfg, tmp_path / "run", printer=printed.append)
    assert any(f"scene_tags: {expected} boxes in the training data are beyond" in line for line in printed)


def test_nms_gives_the_same_boxes_with_all_overlaps_at_once_and_row_by_row(monkeypatch):
    rng = np.random.default_rng(3)
    corners = rng.uniform(0, 300, (600, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(5, 80, (600, 2))], 1)
    scores = np.round(rng.uniform(0, 1, 600), 2)  # ties too
    for count in (40, 600):  # below and above detection.ALL_OVERLAPS_UP_TO
        kept = nms(boxes[:count], scores[:count], 0.5)
        monkeypatch.setattr(detection, "ALL_OVERLAPS_UP_TO", 0 if count < 256 else 10_000)
        assert np.array_equal(kept, nms(boxes[:count], scores[:count], 0.5))
        monkeypatch.undo()
