"""Fusion models: a second backbone whose deepest map joins the trunk's before the heads."""

import dataclasses

import pytest
import torch
import yaml

from tests.conftest import edit_train, write_registry
from tests.test_export_runtime import THRESHOLDS, distinct_task_norms
from waterdrop.config import ConfigError, config_from_dict, config_to_dict, load_registry
from waterdrop.engine.checkpoint import load_net
from waterdrop.engine.model import WaterdropModel
from waterdrop.engine.optim import TrunkLrConstructor
from waterdrop.explain import grad_cam
from waterdrop.export import export_onnx
from waterdrop.model.multitask import MultiTaskNet

FUSION = {"backbone": "test_efficientnet", "pretrained": None, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _fusion_registry(folder, demo_root, **model):
    return write_registry(folder, demo_root, fusion=dict(FUSION), **model)


def _net(registry) -> MultiTaskNet:
    torch.manual_seed(0)
    net = MultiTaskNet(load_registry(registry)).eval()
    distinct_task_norms(net)
    return net


def test_config_reads_the_second_backbone_and_survives_the_snapshot(tmp_path, demo_root):
    cfg = load_registry(_fusion_registry(tmp_path, demo_root))
    assert cfg.model.fusion.backbone == "test_efficientnet" and cfg.model.fusion.std == [0.5, 0.5, 0.5]
    assert config_from_dict(config_to_dict(cfg)).model.fusion == cfg.model.fusion
    data = config_to_dict(cfg)
    del data["model"]["fusion"]  # a snapshot from before fusion models: none
    assert config_from_dict(data).model.fusion is None
    registry = yaml.safe_load((tmp_path / "registry.yaml").read_text())
    registry["model"]["fusion"] = {"backbone": "test_resnet", "pretrained": str(tmp_path / "none.pth")}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(registry))
    with pytest.raises(ConfigError, match="model.fusion.pretrained.*existing local weights file"):
        load_registry(tmp_path / "registry.yaml")
    registry["model"]["fusion"] = {"backbone": "no_such_net"}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(registry))
    with pytest.raises(ConfigError, match="model.fusion.*unknown timm backbone 'no_such_net'"):
        MultiTaskNet(load_registry(tmp_path / "registry.yaml"))


@pytest.mark.parametrize("stages", [[-1], []])
def test_heads_read_both_maps_and_every_path_agrees(tmp_path, demo_root, stages):
    net = _net(_fusion_registry(tmp_path, demo_root, task_bn_stages=stages))
    plain = MultiTaskNet(load_registry(write_registry(tmp_path / "plain", demo_root)))
    assert net.channels[-1] == plain.trunk.channels[-1] + net.fusion.channels[-1]
    assert all(head.in_channels == net.channels for head in net.heads.values())
    images = torch.randint(0, 256, (3, 3, 64, 64)).float()
    with torch.no_grad():
        stacked, unstacked = net.forward_all(images), net.forward_all(images, stack_tasks=False)
        assert stacked.keys() == unstacked.keys()
        for key in stacked:
            assert torch.allclose(stacked[key], unstacked[key], atol=1e-5), key
        # Per-sample routing (training's path) gives each task's own outputs too.
        outputs = net.forward_tasks(images[:2], torch.tensor([0, 1]))
        expected = net.heads["thriller"](net.features_per_task(images[1:2])[1])["logits"]
    assert torch.allclose(outputs["thriller"]["logits"], expected, atol=1e-5)
    # The fusion backbone's map matters: zeroing its weights changes the decision.
    with torch.no_grad():
        for p in net.fusion.parameters():
            p.zero_()
        assert not torch.allclose(net.forward_all(images)["disgusting.prob"], stacked["disgusting.prob"])


def test_export_matches_pytorch_and_a_checkpoint_loads_without_the_weights_file(tmp_path, demo_root):
    registry = _fusion_registry(tmp_path, demo_root)
    net = _net(registry)
    cfg = load_registry(registry)
    parity = export_onnx(net, cfg, THRESHOLDS, tmp_path / "model.onnx")
    assert max(parity.values()) <= 1e-4
    weights = tmp_path / "fusion.pth"
    torch.save(net.fusion.state_dict(), weights)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, fusion=dataclasses.replace(cfg.model.fusion, pretrained=weights)))
    torch.save({"meta": {"waterdrop": {"config": config_to_dict(cfg)}},
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "run.pth")
    weights.unlink()  # the checkpoint holds every weight
    loaded, _, _ = load_net(tmp_path / "run.pth")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_fusion_backbone_learns_with_the_trunk_and_grad_cam_runs(tmp_path, demo_root):
    registry = _fusion_registry(tmp_path, demo_root)
    model = WaterdropModel(load_registry(registry))
    groups = TrunkLrConstructor({"type": "OptimWrapper", "optimizer": {"type": "AdamW", "lr": 1e-3}},
                                {"trunk_lr_mult": 0.1})(model).optimizer.param_groups
    fusion_ids = {id(p) for p in model.net.fusion.parameters()}
    assert fusion_ids <= {id(p) for p in groups[0]["params"]} and groups[0]["lr"] == pytest.approx(1e-4)
    images = torch.randint(0, 256, (2, 3, 64, 64)).float()
    maps, scores = grad_cam(model.net, images, "disgusting")
    assert maps.shape == (2, 64, 64) and scores.shape == (2,)


def test_a_fusion_teacher_teaches_a_plain_student(tmp_path, demo_root, registry_file):
    teacher_registry = _fusion_registry(tmp_path / "teacher", demo_root)
    teacher = _net(teacher_registry)
    checkpoint = tmp_path / "teacher.pth"
    torch.save({"meta": {"waterdrop": {"config": config_to_dict(load_registry(teacher_registry))}},
                "state_dict": {f"net.{k}": v for k, v in teacher.state_dict().items()}}, checkpoint)
    edit_train(registry_file, distillation={"teacher": str(checkpoint)})
    model = WaterdropModel(load_registry(registry_file))
    assert model.features["distillation"].teacher.fusion is not None
    images = torch.randint(0, 256, (4, 3, 64, 64)).float()
    losses = model(images, torch.tensor([0, 0, 1, 1]), {"disgusting": torch.tensor([0, 1]),
                                                         "thriller": torch.tensor([2, 0])}, mode="loss")
    assert losses["disgusting.loss_distill"] > 0 and losses["thriller.loss_distill"] > 0
