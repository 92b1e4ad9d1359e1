"""Packaged ImageNet weights, their mapping checks, and the fine-tuning controls."""

from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest
import timm
import torch
import yaml
from mmengine.optim import build_optim_wrapper

from tests.conftest import write_registry
from waterdrop.config import ConfigError, load_registry
from waterdrop.engine.checkpoint import load_checkpoint
from waterdrop.engine.model import WaterdropModel
from waterdrop.engine.optim import TrunkLrConstructor  # noqa: F401  (registers it)
from waterdrop.engine.schedule import param_schedulers
from waterdrop.engine.train import build_runner
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.model.pretrained import load_packaged, map_state_dict
from waterdrop.model.task_bn import TaskBatchNorm
from waterdrop.weights import PACKAGED

LITE0 = "tf_efficientnet_lite0"


@pytest.mark.parametrize("backbone", sorted(PACKAGED))
def test_packaged_weights_classify_a_real_photo_correctly(backbone):
    model = timm.create_model(backbone).eval()
    model.load_state_dict(load_packaged(backbone, model.state_dict()))
    size = PACKAGED[backbone].native_size
    photo = cv2.imread(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    rgb = cv2.resize(cv2.cvtColor(photo, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy((rgb.astype(np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == 652  # ImageNet "military uniform"
    assert float(probs[652]) > 0.15


def test_mapping_names_the_first_shape_or_count_mismatch():
    target = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4), "b.num_batches_tracked": torch.zeros(())}
    good = {"_x": torch.ones(2, 3), "_y": torch.ones(4)}
    assert set(map_state_dict("net", good, target)) == {"a.weight", "b.weight"}
    with pytest.raises(ValueError, match="net: tensor '_y' \\(5,\\) does not fit 'b.weight' \\(4,\\)"):
        map_state_dict("net", {"_x": torch.ones(2, 3), "_y": torch.ones(5)}, target)
    with pytest.raises(ValueError, match="3 tensors in the file, 2 in the model; first one without a partner: '_z'"):
        map_state_dict("net", {**good, "_z": torch.ones(1)}, target)


def test_imagenet_trunk_loads_the_weights_into_every_task_bn_copy(tmp_path, demo_root):
    cfg = load_registry(write_registry(tmp_path, demo_root, backbone=LITE0, pretrained="imagenet",
                                       mean=None, std=None, cbam="stages"))
    assert cfg.model.mean == [0.5, 0.5, 0.5] and cfg.model.std == [0.5, 0.5, 0.5]
    net = MultiTaskNet(cfg).eval()
    reference = timm.create_model(LITE0).eval()
    reference.load_state_dict(load_packaged(LITE0, reference.state_dict()))
    torch.testing.assert_close(net.trunk.levels[0].conv_stem.weight, reference.conv_stem.weight)
    branched = [m for m in net.trunk.levels[-1].modules() if isinstance(m, TaskBatchNorm)]
    assert branched
    last_bn = reference.bn2  # the head convolution's norm ends the deepest level (head_conv: auto)
    copies = branched[-1].branches
    assert len(copies) == len(cfg.tasks)
    for bn in copies:
        torch.testing.assert_close(bn.running_var, last_bn.running_var)
        torch.testing.assert_close(bn.weight, last_bn.weight)
    # CBAM after every level starts as the identity: the pretrained features pass unchanged.
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        feats = net.forward_features(x, torch.zeros(2, dtype=torch.long))
        plain = reference.forward_features((x / 255 - 0.5) / 0.5)
    torch.testing.assert_close(feats[-1], plain, atol=1e-4, rtol=1e-4)


def test_registry_mean_and_std_win_over_the_weights_own(tmp_path, demo_root):
    cfg = load_registry(write_registry(tmp_path, demo_root, backbone=LITE0, pretrained="imagenet",
                                       mean=[0.4, 0.4, 0.4], std=None))
    assert cfg.model.mean == [0.4, 0.4, 0.4] and cfg.model.std == [0.5, 0.5, 0.5]


def test_imagenet_on_a_backbone_without_packaged_weights_says_what_works(tmp_path, demo_root):
    with pytest.raises(ConfigError, match="model.pretrained.*only for tf_efficientnet_lite0.*give a local weights"):
        load_registry(write_registry(tmp_path, demo_root, backbone="resnet18", pretrained="imagenet"))
    with pytest.raises(ConfigError, match="model.pretrained.*'imagenet'.*or an existing local weights file"):
        load_registry(write_registry(tmp_path, demo_root, pretrained="no_such_file.pth"))


def test_trunk_and_heads_get_their_own_learning_rates(registry_file):
    text = yaml.safe_load(registry_file.read_text())
    text["train"]["optimizer"]["trunk_lr_mult"] = 0.1
    registry_file.write_text(yaml.safe_dump(text))
    cfg = load_registry(registry_file)
    model = WaterdropModel(cfg)
    wrapper = build_optim_wrapper(model, {"optimizer": {"type": "AdamW", "lr": 0.01},
                                          "constructor": "TrunkLrConstructor",
                                          "paramwise_cfg": {"trunk_lr_mult": cfg.train.trunk_lr_mult}})
    trunk, rest = wrapper.optimizer.param_groups
    assert trunk["lr"] == pytest.approx(0.001) and rest["lr"] == pytest.approx(0.01)
    trunk_ids = {id(p) for p in model.net.trunk.parameters()}
    assert {id(p) for p in trunk["params"]} == trunk_ids
    assert len(trunk["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert not trunk_ids & {id(p) for p in rest["params"]}


def test_a_frozen_trunk_keeps_its_weights_while_the_heads_learn_then_thaws(registry_file, tmp_path):
    text = yaml.safe_load(registry_file.read_text())
    text["train"].update(freeze_trunk_epochs=1, epochs=2)
    text["train"]["optimizer"]["trunk_lr_mult"] = 0.5
    registry_file.write_text(yaml.safe_dump(text))
    runner = build_runner(load_registry(registry_file), tmp_path / "run", printer=lambda *a, **k: None)
    net = runner.model.net
    trunk_before = {k: v.clone() for k, v in net.trunk.named_parameters()}
    heads_before = {k: v.clone() for k, v in net.heads.named_parameters()}
    runner.train()
    after_first = load_checkpoint(tmp_path / "run" / "epoch_1.pth")["state_dict"]
    assert all(torch.equal(after_first[f"net.trunk.{k}"], v) for k, v in trunk_before.items())
    assert any(not torch.equal(after_first[f"net.heads.{k}"], v) for k, v in heads_before.items())
    assert any(not torch.equal(v, trunk_before[k]) for k, v in net.trunk.named_parameters())  # thawed in epoch 2
    trunk_group, head_group = runner.optim_wrapper.optimizer.param_groups
    assert trunk_group["initial_lr"] == pytest.approx(0.5 * head_group["initial_lr"])


def test_onecycle_schedule_is_torchs_one_cycle_per_group_and_resumes_exactly(registry_file, tmp_path):
    """``train.schedule: onecycle`` gives every group torch's OneCycleLR (rate and beta1) scaled to
    its own rate, and a scheduler restored mid-run continues the same curve."""
    text = yaml.safe_load(registry_file.read_text())
    text["train"].update(schedule="onecycle", warmup_epochs=0.9, epochs=3)
    text["train"]["optimizer"]["trunk_lr_mult"] = 0.1
    registry_file.write_text(yaml.safe_dump(text))
    runner = build_runner(load_registry(registry_file), tmp_path / "run", printer=lambda *a, **k: None)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    schedulers = runner.build_param_scheduler(runner.param_schedulers)
    optimizer = runner.optim_wrapper.optimizer
    steps = 3 * len(runner.train_dataloader)
    reference_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=text["train"]["optimizer"]["lr"])
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_optimizer, max_lr=text["train"]["optimizer"]["lr"],
                                                    total_steps=steps, pct_start=0.3)
    rates = []
    for step in range(steps):
        trunk, heads = optimizer.param_groups[:2]
        expected = reference_optimizer.param_groups[0]
        assert heads["lr"] == pytest.approx(expected["lr"], rel=1e-9), step
        assert trunk["lr"] == pytest.approx(0.1 * expected["lr"], rel=1e-9), step
        assert trunk["betas"][0] == heads["betas"][0] == pytest.approx(expected["betas"][0], rel=1e-9), step
        rates.append(heads["lr"])
        if step == steps // 2:
            saved = [scheduler.state_dict() for scheduler in schedulers]
        runner.optim_wrapper.step()  # counted: the schedulers check the order
        reference_optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        if step < steps - 1:
            reference.step()
    assert rates[-1] < rates[0] / 1000 and max(rates) == pytest.approx(text["train"]["optimizer"]["lr"], rel=1e-2)
    runner.optim_wrapper.step()
    for scheduler, state in zip(schedulers, saved):  # a resumed run: the curve from the saved step on
        scheduler.load_state_dict(state)
        scheduler.step()
    assert optimizer.param_groups[1]["lr"] == pytest.approx(rates[steps // 2 + 1], rel=1e-9)


def test_onecycle_refuses_a_rise_that_never_ends_and_cycles_only_adamw_momentum():
    with pytest.raises(ValueError, match="must end before the last of 3 epochs"):
        param_schedulers("onecycle", 3, 3.0, 10)
    adamw = [s["type"] for s in param_schedulers("onecycle", 3, 0.9, 10)]
    sgd = [s["type"] for s in param_schedulers("onecycle", 3, 0.9, 10, cycle_momentum=False)]
    assert adamw == ["CosineCycleLR", "CosineCycleMomentum"] and sgd == ["CosineCycleLR"]
    assert [s["type"] for s in param_schedulers("cosine", 3, 0.5, 10)] == ["LinearLR", "CosineAnnealingLR"]
    assert [s["type"] for s in param_schedulers("cosine", 3, 0.01, 10)] == ["CosineAnnealingLR"]  # < 1 iteration
