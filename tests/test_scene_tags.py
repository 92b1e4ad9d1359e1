"""Scene tags: relation graph, repeat-factor sampling, focal loss, per-label targets."""

import numpy as np
import pytest
import torch

from tests.conftest import edit_task
from waterdrop.config import ConfigError, load_registry
from waterdrop.data.sampler import RepeatFactorStream, repeat_factors
from waterdrop.evaluation.metrics import multilabel_report
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
