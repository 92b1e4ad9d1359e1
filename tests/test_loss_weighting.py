"""Task loss weighting: fixed, uncertainty (learned log-variances) and GradNorm."""

import csv
import math

import pytest
import torch
from torch import nn

from tests.conftest import edit_train
from waterdrop.config import ConfigError, LossWeightingConfig, config_from_dict, config_to_dict, load_registry
from waterdrop.engine.loss_weighting import TaskLossWeighting, last_shared_weight
from waterdrop.engine.model import WaterdropModel
from waterdrop.engine.optim import TrunkLrConstructor
from waterdrop.engine.train import run_training
from waterdrop.model.trunk import Trunk


def _batch(seed=0):
    """Two images of each of the three demo tasks."""
    images = torch.randint(0, 256, (6, 3, 64, 64), generator=torch.Generator().manual_seed(seed)).float()
    task_index = torch.tensor([0, 0, 1, 1, 2, 2])
    tags = torch.zeros(2, 10)
    tags[0, 0] = 1
    return images, task_index, {"disgusting": torch.tensor([0, 2]), "thriller": torch.tensor([1, 0]),
                                "scene_tags": tags}


def test_config_takes_a_name_or_a_mapping_and_refuses_bad_values(registry_file):
    assert load_registry(registry_file).train.loss_weighting == LossWeightingConfig("fixed")
    edit_train(registry_file, loss_weighting="uncertainty")
    assert load_registry(registry_file).train.loss_weighting.type == "uncertainty"
    edit_train(registry_file, loss_weighting={"type": "gradnorm", "alpha": 0.5, "lr": 0.1})
    cfg = load_registry(registry_file)
    assert cfg.train.loss_weighting == LossWeightingConfig("gradnorm", 0.5, 0.1)
    assert config_from_dict(config_to_dict(cfg)).train.loss_weighting == cfg.train.loss_weighting
    edit_train(registry_file, loss_weighting="learned")
    with pytest.raises(ConfigError, match="train.loss_weighting.*fixed, uncertainty, gradnorm"):
        load_registry(registry_file)
    edit_train(registry_file, loss_weighting={"type": "gradnorm", "alfa": 1.0})
    with pytest.raises(ConfigError, match="loss_weighting.alfa.*unknown key"):
        load_registry(registry_file)


def test_snapshot_without_the_key_reads_as_fixed(registry_file):
    data = config_to_dict(load_registry(registry_file))
    del data["train"]["loss_weighting"], data["train"]["distillation"]
    assert config_from_dict(data).train.loss_weighting.type == "fixed"


@pytest.mark.parametrize("method", ["fixed", "uncertainty", "gradnorm"])
def test_a_snapshot_with_the_earlier_recorded_defaults_reads_as_todays(registry_file, method):
    # Format 1 recorded alpha 1.5 and lr 0.025 whatever the method; such a run must still resume.
    edit_train(registry_file, loss_weighting=method)
    data = config_to_dict(load_registry(registry_file))
    del data["snapshot_format"]
    data["train"]["loss_weighting"] = {"type": method, "alpha": 1.5, "lr": 0.025}
    assert config_to_dict(config_from_dict(data)) == config_to_dict(load_registry(registry_file))
    # Today's snapshots say what they mean: an uncertainty lr of 0.025 was asked for.
    edit_train(registry_file, loss_weighting={"type": "uncertainty", "lr": 0.025})
    chosen = config_to_dict(load_registry(registry_file))
    assert config_from_dict(chosen).train.loss_weighting.lr == 0.025


def test_a_gradnorm_state_saved_before_batch_counts_starts_its_baselines_afresh(registry_file):
    edit_train(registry_file, loss_weighting="gradnorm")
    model = WaterdropModel(load_registry(registry_file))
    state = model.state_dict()
    del state["weighting.initial_batches"]
    state["weighting.initial_losses"] = torch.tensor([0.7, float("nan"), 0.3])
    state["weighting.weights"] = torch.tensor([1.2, 0.8, 1.0])
    model.load_state_dict(state)
    assert model.weighting.initial_losses.tolist() == [0, 0, 0]
    assert model.weighting.initial_batches.tolist() == [0, 0, 0]
    assert model.weighting.weights.tolist() == pytest.approx([1.2, 0.8, 1.0])


def test_uncertainty_scales_each_task_by_exp_minus_s_and_adds_half_s(registry_file):
    fixed = WaterdropModel(load_registry(registry_file)).eval()  # eval: no dropout or BN updates between calls
    edit_train(registry_file, loss_weighting="uncertainty")
    model = WaterdropModel(load_registry(registry_file)).eval()
    model.net.load_state_dict(fixed.net.state_dict())
    s = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        model.weighting.log_variances.copy_(s)
    torch.manual_seed(0)
    plain = fixed(*_batch(), mode="loss")
    torch.manual_seed(0)
    weighted = model(*_batch(), mode="loss")
    for t, name in enumerate(["disgusting", "thriller", "scene_tags"]):
        terms = [k for k in plain if k.startswith(name + ".")]
        assert terms
        for key in terms:
            assert weighted[key].item() == pytest.approx(plain[key].item() * math.exp(-s[t]), rel=1e-5)
        assert weighted[f"{name}.loss_uncertainty"].item() == pytest.approx(s[t].item() / 2)
        assert weighted[f"{name}.weight"].item() == pytest.approx(math.exp(-s[t]), rel=1e-6)
        assert not weighted[f"{name}.weight"].requires_grad
    # d/ds [exp(-s) L + s / 2] = -exp(-s) L + 1/2: a task with a large loss raises its s (less weight).
    total = sum(v for k, v in weighted.items() if "loss" in k)
    total.backward()
    for t, name in enumerate(["disgusting", "thriller", "scene_tags"]):
        task_loss = sum(plain[k].item() for k in plain if k.startswith(name + "."))
        expected = -math.exp(-s[t]) * task_loss + 0.5
        assert model.weighting.log_variances.grad[t].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_log_variances_are_in_their_own_group_without_weight_decay(registry_file):
    edit_train(registry_file, loss_weighting="uncertainty")
    model = WaterdropModel(load_registry(registry_file))
    constructor = TrunkLrConstructor({"type": "OptimWrapper",
                                      "optimizer": {"type": "AdamW", "lr": 1e-3, "weight_decay": 0.05}},
                                     {"trunk_lr_mult": 0.1})
    groups = constructor(model).optimizer.param_groups
    where = [i for i, g in enumerate(groups) for p in g["params"] if p is model.weighting.log_variances]
    assert len(where) == 1
    assert groups[where[0]]["weight_decay"] == 0.0 and groups[where[0]]["params"] == [model.weighting.log_variances]
    assert [g["weight_decay"] for g in groups[:2]] == [0.05, 0.05]
    assert groups[where[0]]["lr"] == pytest.approx(1e-3)  # the optimizer's, unless given
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    constructor = TrunkLrConstructor({"type": "OptimWrapper", "optimizer": {"type": "AdamW", "lr": 1e-3}},
                                     {"trunk_lr_mult": 0.1, "loss_weight_lr": 0.05})
    assert constructor(model).optimizer.param_groups[-1]["lr"] == pytest.approx(0.05)


class _Shared(nn.Module):
    """A one-convolution 'trunk' whose last level GradNorm reads."""

    def __init__(self):
        super().__init__()
        self.levels = nn.ModuleList([nn.Sequential(nn.Conv2d(2, 3, 1))])


def _two_task_losses(shared: _Shared, scale_a: float, scale_b: float) -> dict:
    """Losses of tasks 0 and 1 whose values and gradient norms are in the ratio of the scales."""
    torch.manual_seed(0)
    out = shared.levels[0](torch.randn(4, 2, 3, 3))
    return {0: scale_a * out.pow(2).mean(), 1: scale_b * out.pow(2).mean()}


def test_gradnorm_moves_weight_to_the_task_with_the_smaller_gradient_and_keeps_the_sum():
    shared = _Shared()
    weighting = TaskLossWeighting(LossWeightingConfig("gradnorm", alpha=1.5, lr=0.05), ["a", "b"])
    losses = _two_task_losses(shared, 10.0, 1.0)  # task a's gradient norm is 10x task b's
    weighting.gradnorm_step(losses, last_shared_weight(shared))
    a, b = weighting.weights.tolist()
    assert a < 1 < b and a + b == pytest.approx(2.0)
    # The first losses were recorded: equal training rates, so only the norms matter.
    assert weighting.initial_losses.tolist() == pytest.approx([losses[0].item(), losses[1].item()])
    for _ in range(200):
        weighting.gradnorm_step(_two_task_losses(shared, 10.0, 1.0), last_shared_weight(shared))
    a, b = weighting.weights.tolist()
    # Balanced norms: w_a * 10 g = w_b * g, with w_a + w_b = 2, give w_a = 2/11, up to one step.
    assert a == pytest.approx(2 / 11, abs=0.06) and a + b == pytest.approx(2.0)
    weighted = weighting.weigh({"a.loss_x": losses[0], "b.loss_x": losses[1]})
    assert weighted["a.loss_x"].item() == pytest.approx(losses[0].item() * a, rel=1e-5)
    assert weighted["a.weight"].item() == pytest.approx(a)


def test_gradnorm_favours_the_task_that_trains_slower():
    shared = _Shared()
    weighting = TaskLossWeighting(LossWeightingConfig("gradnorm", alpha=1.5, lr=0.05), ["a", "b"])
    weighting.gradnorm_step(_two_task_losses(shared, 1.0, 1.0), last_shared_weight(shared))
    assert weighting.weights.tolist() == pytest.approx([1.0, 1.0])  # equal norms, equal rates: no change
    # Task a's loss has fallen to a tenth of its first value, task b's has not moved.
    weighting.gradnorm_step(_two_task_losses(shared, 0.1, 1.0), last_shared_weight(shared))
    a, b = weighting.weights.tolist()
    assert a < 1 < b


def test_one_odd_first_batch_does_not_fix_the_weights_for_the_run():
    shared = _Shared()
    weighting = TaskLossWeighting(LossWeightingConfig("gradnorm", alpha=1.5, lr=0.025), ["a", "b"])
    # Task a's first batch had (almost) no loss, e.g. its labeled samples were easy by chance.
    weighting.gradnorm_step(_two_task_losses(shared, 1e-5, 1.0), last_shared_weight(shared))
    for _ in range(200):
        weighting.gradnorm_step(_two_task_losses(shared, 1.0, 1.0), last_shared_weight(shared))
    # The initial loss is the mean of the first 20 batches, so both tasks train at about the
    # same rate and keep about the same weight (from one batch, a would take nearly all of it).
    assert weighting.weights.tolist() == pytest.approx([1.0, 1.0], abs=0.15)
    assert weighting.initial_batches.tolist() == [20, 20]


def test_gradnorm_norms_are_unscaled_from_the_amp_loss_scale_and_nan_is_skipped():
    shared = _Shared()
    plain = TaskLossWeighting(LossWeightingConfig("gradnorm"), ["a", "b"])
    scaled = TaskLossWeighting(LossWeightingConfig("gradnorm"), ["a", "b"])
    losses = _two_task_losses(shared, 3.0, 1.0)
    by_hand = [torch.autograd.grad(losses[t], shared.levels[0][0].weight, retain_graph=True)[0].norm().item()
               for t in (0, 1)]
    norms = plain.gradnorm_step(losses, last_shared_weight(shared))
    scaled_norms = scaled.gradnorm_step(_two_task_losses(shared, 3.0, 1.0), last_shared_weight(shared),
                                        loss_scale=1024.0)
    assert norms.tolist() == pytest.approx(by_hand, rel=1e-5)
    assert scaled_norms.tolist() == pytest.approx(by_hand, rel=1e-4)
    assert scaled.weights.tolist() == pytest.approx(plain.weights.tolist(), rel=1e-5)
    before = plain.weights.clone()
    plain.gradnorm_step(_two_task_losses(shared, float("nan"), 1.0), last_shared_weight(shared))
    assert torch.equal(plain.weights, before)
    shared.requires_grad_(False)  # a frozen trunk: nothing to balance
    plain.gradnorm_step(_two_task_losses(shared, 3.0, 1.0), last_shared_weight(shared))
    assert torch.equal(plain.weights, before)


@pytest.mark.parametrize("method", ["uncertainty", "gradnorm"])
def test_a_run_logs_plots_and_checkpoints_the_learned_weights(registry_file, tmp_path, method):
    edit_train(registry_file, loss_weighting={"type": method, "lr": 0.05} if method == "gradnorm" else method,
               epochs=2)
    printed = []
    run_training(registry_file, tmp_path / "run", printer=lambda *text, **_: printed.extend(text))
    with open(tmp_path / "run" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = ["disgusting", "thriller", "scene_tags"]
    weights = [[float(row[f"{name}.weight"]) for name in names] for row in rows]
    assert len(weights) == 2 and all(w > 0 for epoch in weights for w in epoch)
    assert any(abs(w - 1.0) > 1e-4 for w in weights[-1])  # they were learned
    assert (tmp_path / "run" / "loss_weights.png").stat().st_size > 1000
    assert any("disgusting.weight" in line for line in printed)  # the progress line shows them
    state = torch.load(tmp_path / "run" / "epoch_2.pth", map_location="cpu", weights_only=False)["state_dict"]
    key = "weighting.log_variances" if method == "uncertainty" else "weighting.weights"
    stored = state[key]
    if method == "uncertainty":
        stored = torch.exp(-stored)
    else:
        assert stored.sum().item() == pytest.approx(3.0, rel=1e-5)
    assert all(torch.isfinite(stored))


@pytest.mark.parametrize("backbone, cbam, expected", [("test_resnet", "none", "layer4.0.conv2"),
                                                      ("test_resnet", "blocks", "layer4.0.conv2"),
                                                      ("test_efficientnet", "stages", "blocks_4.0.conv_pwl")])
def test_gradnorm_balances_the_main_paths_last_convolution(backbone, cbam, expected):
    # Not the shortcut projection nor CBAM's spatial convolution, both registered after it.
    trunk = Trunk(backbone, None, cbam)
    weight = last_shared_weight(trunk)
    assert [name for name, m in trunk.levels[-1].named_modules() if getattr(m, "weight", None) is weight] == [expected]


def test_a_task_named_with_loss_does_not_turn_its_weight_into_a_loss(registry_file):
    model = WaterdropModel(load_registry(registry_file))
    loss, log_vars = model.parse_losses({"gloss.loss_cls": torch.tensor(2.0), "gloss.weight": torch.tensor(5.0),
                                         "sky.loss_det": torch.tensor([1.0, 3.0])})
    assert loss.item() == pytest.approx(4.0)
    assert log_vars["loss"].item() == pytest.approx(4.0) and log_vars["gloss.weight"].item() == 5.0


def test_config_errors_name_the_choices_and_refuse_gradnorm_settings_elsewhere(registry_file):
    edit_train(registry_file, loss_weighting=3)
    with pytest.raises(ConfigError, match="loss_weighting.*fixed, uncertainty, gradnorm"):
        load_registry(registry_file)
    edit_train(registry_file, loss_weighting={"type": "uncertainty", "alpha": 0.1})
    with pytest.raises(ConfigError, match="loss_weighting.alpha.*not a setting of uncertainty"):
        load_registry(registry_file)
    edit_train(registry_file, loss_weighting={"type": "fixed", "lr": 0.1})
    with pytest.raises(ConfigError, match="loss_weighting.lr.*not a setting of fixed"):
        load_registry(registry_file)
