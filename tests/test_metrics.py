"""Metrics against hand-computed values, including precision at the deploy prevalence."""

import numpy as np
import pytest

from waterdrop.evaluation.metrics import (
    at_threshold,
    average_precision,
    binary_report,
    choose_threshold,
    multilabel_report,
    negative_weight,
    roc_auc,
)


def test_average_precision_and_auc_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    truth = np.array([1, 0, 1, 0, 0])
    # positives at ranks 1 and 3: AP = (1/1 + 2/3) / 2
    assert average_precision(scores, truth) == pytest.approx((1 + 2 / 3) / 2)
    # pairs (pos, neg) ordered right: 3 of the first positive, 2 of the second, over 6 pairs
    assert roc_auc(scores, truth) == pytest.approx(5 / 6)
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert np.isnan(average_precision(scores, np.zeros(5, int)))


def test_deploy_prevalence_reproduces_the_online_precision_collapse():
    # 1:1 validation: recall 0.98 with 98 TP, and 6.26 % of negatives flagged (precision 0.94)
    truth = np.r_[np.ones(1000), np.zeros(10000)].astype(int)
    scores = np.r_[np.r_[np.ones(980), np.zeros(20)], np.r_[np.ones(626), np.zeros(9374)]]
    weight = negative_weight(truth, 1 / 201)
    assert weight == pytest.approx(200 * 1000 / 10000)
    online = at_threshold(scores, truth, 0.5, weight)
    balanced = at_threshold(scores, truth, 0.5, negative_weight(truth, 0.5))
    assert balanced["precision"] == pytest.approx(0.98 / (0.98 + 0.0626), abs=1e-3)  # ~0.94
    assert online["precision"] == pytest.approx(0.98 / (0.98 + 200 * 0.0626), abs=1e-3)  # ~0.07
    assert online["recall"] == pytest.approx(0.98)


def test_threshold_for_recall_and_precision_targets():
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.4, 0.3, 0.2, 0.1])
    truth = np.array([1, 1, 0, 1, 1, 0, 0, 0])
    assert choose_threshold(scores, truth, "recall", 0.75) == (0.7, True)
    assert choose_threshold(scores, truth, "recall", 1.0) == (0.4, True)
    assert choose_threshold(scores, truth, "precision", 1.0) == (0.9, True)
    assert choose_threshold(scores, truth, "precision", 0.8) == (0.4, True)
    # unreachable target: the closest threshold (highest precision) is returned, flagged as not met
    unreachable = choose_threshold(np.array([0.9, 0.8, 0.7]), np.array([0, 1, 1]), "precision", 0.99, 100)
    assert unreachable == (0.7, False)


def test_binary_report_fields():
    rng = np.random.default_rng(0)
    truth = (rng.random(400) < 0.3).astype(int)
    scores = np.clip(truth * 0.4 + rng.random(400) * 0.6, 0, 1)
    report = binary_report(scores, truth, 0.005, "recall", 0.9)
    assert report["at_threshold"]["recall"] >= 0.9
    assert report["deploy"]["precision"] < report["at_threshold"]["precision"]
    assert report["deploy"]["ap"] < report["ap"]


def test_multilabel_report_masks_unknown_and_falls_back_on_rare_labels():
    truth = np.array([[1, 0, -1], [1, 0, 1], [0, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    scores = np.where(truth == 1, 0.9, 0.1).astype(float)
    scores[0, 2] = 0.99  # unknown entry with a high score: must not count as a false positive
    report = multilabel_report(scores, truth, ["a", "b", "c"], "precision", 0.9)
    assert report["labels"]["a"]["ap"] == pytest.approx(1.0)
    assert report["labels"]["c"]["ap"] == pytest.approx(1.0)
    assert report["fallback_labels"] == ["b", "c"]
    assert report["thresholds"]["b"] == 0.5
    assert report["micro"]["precision"] == pytest.approx(1.0)
