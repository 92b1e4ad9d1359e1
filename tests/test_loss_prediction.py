"""The loss prediction module: ranking loss by hand, training, gradients, config and snapshot."""

import pytest
import torch

from tests.conftest import edit_task
from waterdrop.config import ConfigError, config_from_dict, config_to_dict, load_registry
from waterdrop.engine.model import WaterdropModel
from waterdrop.features import loss_prediction
from waterdrop.features.loss_prediction import LossPredictionModule, ranking_loss
from waterdrop.model import multitask
from waterdrop.model.multitask import MultiTaskNet

TERM = "disgusting.loss_lossprediction"


def _batch(n=6, seed=0):
    images = torch.randint(0, 256, (n, 3, 64, 64), generator=torch.Generator().manual_seed(seed)).float()
    return images, torch.zeros(n, dtype=torch.long), {"disgusting": torch.tensor([0, 1, 2, 0, 3, 0][:n])}


def test_ranking_loss_on_hand_made_numbers():
    # Pairs are (0, 2) and (1, 3); sample 4 (odd one out) is left out.
    predicted = torch.tensor([0.2, 3.0, 1.0, 0.5, 7.0], requires_grad=True)
    true_loss = torch.tensor([1.0, 2.0, 0.5, 1.0, 0.0])
    # (0, 2): l0 > l2 but p0 < p2: max(0, -(+1) * (0.2 - 1.0) + 1) = 1.8
    # (1, 3): l1 > l3 and p1 - p3 = 2.5 >= margin: max(0, -2.5 + 1) = 0
    loss = ranking_loss(predicted, true_loss, margin=1.0)
    assert loss.item() == pytest.approx((1.8 + 0.0) / 2)
    loss.backward()
    # Only the violated pair pushes: p0 up, p2 down, by 1 / pairs each.
    assert predicted.grad.tolist() == pytest.approx([-0.5, 0.0, 0.5, 0.0, 0.0])
    # Equal true losses cost the margin and give no gradient; a lower first loss flips the sign.
    assert ranking_loss(torch.tensor([5.0, 0.0]), torch.tensor([1.0, 1.0]), 0.5).item() == pytest.approx(0.5)
    assert ranking_loss(torch.tensor([0.0, 0.3]), torch.tensor([1.0, 2.0]), 1.0).item() == pytest.approx(0.7)
    with pytest.raises(ValueError, match="at least two"):
        ranking_loss(torch.tensor([1.0]), torch.tensor([1.0]), 1.0)


def test_module_pools_each_chosen_level_to_one_scalar_per_sample():
    module = LossPredictionModule([8, 16, 32], levels=[0, 2], hidden=4)
    feats = [torch.randn(3, c, 4, 4) for c in (8, 16, 32)]
    assert module(feats).shape == (3,)
    assert [p[0].in_features for p in module.projections] == [8, 32] and module.out.in_features == 8


def test_term_is_trained_and_reaches_the_module_but_not_the_trunk(registry_file):
    edit_task(registry_file, "disgusting", loss_prediction={"hidden": 16})
    model = WaterdropModel(load_registry(registry_file))
    losses = model(*_batch(), mode="loss")
    assert torch.isfinite(losses[TERM]) and losses[TERM] > 0
    losses[TERM].backward()
    module = model.net.features["loss_prediction"].per_task["disgusting"]
    # Every weight learns (the output bias cancels in p_i - p_j, so only the weights are checked).
    assert all(p.grad is not None for p in module.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in module.named_parameters() if n.endswith("weight"))
    assert all(p.grad is None for p in model.net.trunk.parameters())
    assert all(p.grad is None for p in model.net.heads.parameters())

    edit_task(registry_file, "disgusting", loss_prediction={"hidden": 16, "detach": False})
    model = WaterdropModel(load_registry(registry_file))
    model(*_batch(), mode="loss")[TERM].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.trunk.parameters())


def test_target_is_the_heads_detached_per_sample_loss_of_labeled_samples_under_cutmix(registry_file, monkeypatch):
    edit_task(
        registry_file,
        "disgusting",
        loss_prediction={"margin": 0.5, "loss_weight": 2.0},
        augment={"cutmix": 1.0},
        loss_weight=3.0,
    )
    model = WaterdropModel(load_registry(registry_file))
    seen = {}
    original_terms, original_rank = multitask.mixed_terms, loss_prediction.ranking_loss

    def terms(head, outputs, target, mix):
        seen["mixed"] = mix is not None
        seen["terms"] = original_terms(head, outputs, target, mix)
        return seen["terms"]

    def rank(predicted, true_loss, margin):
        seen.update(true_loss=true_loss, margin=margin, predicted=predicted)
        return original_rank(predicted, true_loss, margin)

    monkeypatch.setattr(multitask, "mixed_terms", terms)
    monkeypatch.setattr(loss_prediction, "ranking_loss", rank)
    images, task_index, targets = _batch()
    labeled = {"disgusting": torch.tensor([True, True, False, True, True, False])}
    losses = model(images, task_index, targets, mode="loss", labeled=labeled)
    assert seen["mixed"] and seen["margin"] == 0.5 and not seen["true_loss"].requires_grad
    per_sample = sum(seen["terms"].values()).detach()[labeled["disgusting"]]
    assert sorted(seen["true_loss"].tolist()) == pytest.approx(sorted(per_sample.tolist()))
    assert losses[TERM].item() == pytest.approx(
        original_rank(seen["predicted"], seen["true_loss"], 0.5).item() * 2.0 * 3.0, rel=1e-5
    )
    # Fewer than two labeled samples of the task: no pair, no term.
    one = {"disgusting": torch.tensor([True, False, False, False, False, False])}
    assert TERM not in model(images, task_index, targets, mode="loss", labeled=one)


def test_works_beside_mean_teacher_and_cascade(registry_file):
    edit_task(registry_file, "disgusting", loss_prediction={}, mean_teacher={"rampup_epochs": 0})
    edit_task(registry_file, "thriller", loss_prediction={}, cascade={"backbone": "test_resnet", "hard_per_batch": 2})
    model = WaterdropModel(load_registry(registry_file))
    assert "disgusting" in model.deployed.features["loss_prediction"].per_task  # the EMA copy carries the module along
    images = torch.randint(0, 256, (8, 3, 64, 64), generator=torch.Generator().manual_seed(0)).float()
    task_index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    targets = {"disgusting": torch.tensor([0, 1, 2, 0]), "thriller": torch.tensor([0, 1, 0, 2])}
    losses = model(images, task_index, targets, mode="loss", inputs2=images.flip(3))
    for term in (TERM, "thriller.loss_lossprediction", "thriller.cascade_loss_focal", "disgusting.loss_consistency"):
        assert torch.isfinite(losses[term]), term
    assert "disgusting.predicted_loss" in model.deployed.forward_all(images[:2])


def test_forward_all_reads_each_tasks_own_branch_like_forward_tasks(registry_file):
    edit_task(registry_file, "disgusting", loss_prediction={"levels": [1, 4]})
    edit_task(registry_file, "scene_tags", loss_prediction={})
    net = MultiTaskNet(load_registry(registry_file)).eval()
    images = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(1)).float()
    with torch.no_grad():
        every = net.forward_all(images)
        alone = net.forward_tasks(images, torch.full((3,), 2, dtype=torch.long))["scene_tags"]
    assert every["disgusting.predicted_loss"].shape == (3,) and "thriller.predicted_loss" not in every
    torch.testing.assert_close(every["scene_tags.predicted_loss"], alone["predicted_loss"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("value", "key", "words"),
    [
        ({"levels": "deep"}, "loss_prediction.levels", "a non-empty list of feature levels (0 = the stem"),
        ({"levels": []}, "loss_prediction.levels", "each named once"),
        ({"levels": [1, 1]}, "loss_prediction.levels", "each named once"),
        ({"hidden": 0}, "loss_prediction.hidden", ">= 1"),
        ({"hidden": 2.5}, "loss_prediction.hidden", "an integer"),
        ({"margin": -1}, "loss_prediction.margin", ">= 0"),
        ({"loss_weight": "high"}, "loss_prediction.loss_weight", "a number"),
        ({"detach": "yes"}, "loss_prediction.detach", "true or false"),
        ({"hiden": 64}, "loss_prediction.hiden", "allowed here: detach, hidden, levels, loss_weight, margin"),
        ("on", "loss_prediction", "expected a mapping"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(registry_file, value, key, words):
    edit_task(registry_file, "disgusting", loss_prediction=value)
    with pytest.raises(ConfigError) as err:
        load_registry(registry_file)
    assert err.value.key == key and err.value.file.endswith("disgusting.yaml") and words in str(err.value)


@pytest.mark.parametrize("levels", [[7], [4, -1]])
def test_levels_the_trunk_lacks_are_refused_when_the_model_is_built(registry_file, levels):
    edit_task(registry_file, "disgusting", loss_prediction={"levels": levels})
    with pytest.raises(ConfigError, match="disgusting.yaml: key 'loss_prediction.levels'.*feature levels in 0..4"):
        MultiTaskNet(load_registry(registry_file))


def test_snapshot_keeps_the_setting_and_old_snapshots_mean_off(registry_file):
    edit_task(registry_file, "disgusting", loss_prediction={"hidden": 32, "margin": 0.5})
    cfg = load_registry(registry_file)
    setting = cfg.tasks[0].features["loss_prediction"]
    assert setting.levels == [-4, -3, -2, -1] and setting.detach
    snapshot = config_to_dict(cfg)
    assert config_from_dict(snapshot).tasks[0].features["loss_prediction"] == setting
    old = {**snapshot, "snapshot_format": 2,
           "tasks": [{**{k: v for k, v in task.items() if k != "features"}, "cascade": None, "mean_teacher": None}
                     for task in snapshot["tasks"]]}
    assert "loss_prediction" not in config_from_dict(old).tasks[0].features  # written before the key existed
    old["tasks"][0]["loss_prediction"] = snapshot["tasks"][0]["features"]["loss_prediction"]
    assert config_from_dict(old).tasks[0].features["loss_prediction"] == setting
