"""Trunk levels, per-task BN branching and its isolation, CBAM, and both forward paths."""

import pytest
import torch

from tests.conftest import edit_task, write_registry
from waterdrop.config import ConfigError, load_registry
from waterdrop.model.cbam import CBAM
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.model.task_bn import TaskBatchNorm


def _images(n, size=64, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "resnext50_32x4d", "mobilenetv2_100", "densenet121"])
def test_required_backbones_build_and_run_every_task(tmp_path, demo_root, backbone):
    net = MultiTaskNet(load_registry(write_registry(tmp_path, demo_root, backbone=backbone))).eval()
    assert sum(isinstance(m, TaskBatchNorm) for m in net.trunk.levels[-1].modules()) > 0
    with torch.no_grad():
        out = net.forward_all(_images(2))
    assert out["disgusting.prob"].shape == (2,)
    assert out["disgusting.subclass_prob"].shape == (2, 7)
    assert out["scene_tags.prob"].shape == (2, 10)


def test_stacked_inference_equals_per_sample_routing(registry_file):
    net = MultiTaskNet(load_registry(registry_file)).eval()
    images = _images(3)
    with torch.no_grad():
        stacked = net.forward_all(images)
        for t, name in enumerate(net.task_names):
            routed = net.task_predictions(name, net.forward_tasks(images, torch.full((3,), t))[name])
            for key, value in routed.items():
                torch.testing.assert_close(stacked[f"{name}.{key}"], value, atol=1e-5, rtol=1e-5)


def test_training_on_task_a_leaves_task_b_batchnorm_untouched(registry_file):
    net = MultiTaskNet(load_registry(registry_file)).train()
    state = {k: v.clone() for k, v in net.state_dict().items() if ".branches." in k}
    assert state, "the last level must hold per-task BatchNorms"
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(3):
        out = net.forward_tasks(_images(6, seed=step), torch.zeros(6, dtype=torch.long))
        terms = net.heads["disgusting"].loss(out["disgusting"], torch.tensor([0, 1, 2, 0, 3, 1]))
        loss = sum(v.mean() for v in terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = net.state_dict()
    task_a = [k for k in state if ".branches.0." in k]
    task_b = [k for k in state if ".branches.0." not in k]
    for key in task_b:
        assert torch.equal(after[key], state[key]), f"task B's {key} changed"
    changed_a = [k for k in task_a if not torch.equal(after[k], state[k])]
    assert any("running_mean" in k for k in changed_a) and any(k.endswith(".weight") for k in changed_a)


def test_mixed_batch_uses_each_samples_own_branch(registry_file):
    net = MultiTaskNet(load_registry(registry_file)).eval()
    images = _images(4)
    tags = net.task_names.index("scene_tags")
    mixed = torch.tensor([0, tags, tags, 0])
    with torch.no_grad():
        out = net.forward_tasks(images, mixed)
        alone = net.forward_tasks(images[[1, 2]], torch.tensor([tags, tags]))
    torch.testing.assert_close(out["scene_tags"]["logits"], alone["scene_tags"]["logits"], atol=1e-5, rtol=1e-5)


def test_cbam_blocks_and_stages(tmp_path, demo_root):
    for mode, where in (("blocks", "levels"), ("stages", "attention")):
        folder = tmp_path / mode
        folder.mkdir()
        net = MultiTaskNet(load_registry(write_registry(folder, demo_root, cbam=mode)))
        cbams = [n for n, m in net.trunk.named_modules() if isinstance(m, CBAM)]
        assert cbams and all(n.startswith(where) for n in cbams)
        # timm's zero_init_last starts each block's last BN at weight 0, so a CBAM inside the
        # block sees zeros and gets no gradient on the very first step; give the BNs weight 1.
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.weight)
        net.train()
        out = net.forward_tasks(_images(4), torch.tensor([0, 0, 1, 1]))
        sum(o["logits"].sum() for o in out.values()).backward()
        # CBAM starts as the identity (blend 0): the blend learns first, the attention layers after.
        blends = [p.grad for n, p in net.trunk.named_parameters() if n.endswith("blend")]
        assert blends and all(g is not None and g.abs().sum() > 0 for g in blends)


def test_cbam_starts_as_identity_and_its_attention_only_scales_down():
    x = torch.rand(2, 32, 8, 8)
    cbam = CBAM(32)
    torch.testing.assert_close(cbam(x), x)
    with torch.no_grad():
        cbam.blend.fill_(1.0)
    y = cbam(x)
    assert y.shape == x.shape and (y <= x + 1e-6).all() and (y >= 0).all() and (y < x - 1e-3).any()
    y.sum().backward()
    assert all(p.grad.abs().sum() > 0 for n, p in cbam.named_parameters() if "spatial" in n)


def test_bad_stage_index_and_unknown_backbone_are_config_errors(tmp_path, demo_root):
    with pytest.raises(ConfigError, match="task_bn_stages.*feature levels in 0..4"):
        MultiTaskNet(load_registry(write_registry(tmp_path, demo_root, task_bn_stages=[7])))
    with pytest.raises(ConfigError, match="unknown timm backbone 'resnet_nope'"):
        MultiTaskNet(load_registry(write_registry(tmp_path, demo_root, backbone="resnet_nope")))
    with pytest.raises(ConfigError, match="cbam: blocks needs a ResNet-family"):
        MultiTaskNet(load_registry(write_registry(tmp_path, demo_root, backbone="mobilenetv2_100", cbam="blocks")))


def test_local_pretrained_file_is_loaded(tmp_path, demo_root):
    import timm

    reference = timm.create_model("test_resnet")
    weights = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), weights)
    net = MultiTaskNet(load_registry(write_registry(tmp_path, demo_root, pretrained=str(weights))))
    torch.testing.assert_close(net.trunk.levels[1].layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_cbam_blocks_over_a_local_file_may_miss_only_the_cbam_weights(tmp_path, demo_root):
    import timm

    reference = timm.create_model("test_resnet")
    weights = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), weights)
    net = MultiTaskNet(load_registry(write_registry(tmp_path, demo_root, pretrained=str(weights), cbam="blocks")))
    torch.testing.assert_close(net.trunk.levels[1].layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    state = reference.state_dict()
    del state["layer2.0.conv1.weight"]
    torch.save(state, weights)
    with pytest.raises(ConfigError, match="first 'layer2.0.conv1.weight' \\(only the CBAM parameters may be missing"):
        MultiTaskNet(load_registry(write_registry(tmp_path, demo_root, pretrained=str(weights), cbam="blocks")))


def test_the_cascade_trunk_starts_from_the_registry_weights_and_cbam(tmp_path, demo_root):
    import timm

    reference = timm.create_model("test_resnet")
    weights = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), weights)
    registry = write_registry(tmp_path, demo_root, pretrained=str(weights), cbam="stages")
    edit_task(registry, "thriller", cascade={"backbone": "test_resnet", "hard_per_batch": 4})
    net = MultiTaskNet(load_registry(registry))
    second = net.features["cascade"].per_task["thriller"].trunk
    torch.testing.assert_close(second.levels[1].layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert any(isinstance(m, CBAM) for m in second.modules())


def test_task_bn_blocks_branches_only_the_last_blocks_of_the_level(tmp_path, demo_root):
    cfg = load_registry(write_registry(tmp_path, demo_root, backbone="tf_efficientnet_lite0", task_bn_blocks=1,
                                       head_conv=False))
    net = MultiTaskNet(cfg).eval()
    blocks = net.trunk.blocks(4)
    assert net.shared_blocks == len(blocks) - 1 == 4
    per_task = [m for m in net.modules() if isinstance(m, TaskBatchNorm)]
    assert per_task and all(any(m is n for n in blocks[-1].modules()) for m in per_task)
    images = torch.randint(0, 256, (3, 3, 64, 64)).float()
    with torch.no_grad():
        stacked, one_by_one = net.forward_all(images), net.forward_all(images, stack_tasks=False)
        routed = net.forward_tasks(images, torch.tensor([1, 1, 1]))["thriller"]
    assert all(torch.allclose(stacked[k], one_by_one[k], atol=1e-6) for k in stacked)
    assert torch.allclose(net.task_predictions("thriller", routed)["prob"], stacked["thriller.prob"], atol=1e-6)
    with pytest.raises(ConfigError, match="task_bn_blocks.*has 5 blocks"):
        MultiTaskNet(load_registry(write_registry(tmp_path, demo_root, backbone="tf_efficientnet_lite0",
                                                  task_bn_blocks=6, head_conv=False)))


def test_head_conv_ends_the_deepest_level_as_timm_forward_features_does(tmp_path, demo_root):
    import timm

    reference = timm.create_model("test_efficientnet").eval()
    weights = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), weights)
    cfg = load_registry(write_registry(tmp_path, demo_root, backbone="test_efficientnet", pretrained=str(weights),
                                       head_conv=True, task_bn_blocks=1))
    net = MultiTaskNet(cfg).eval()
    assert net.channels[-1] == reference.num_features != MultiTaskNet(load_registry(write_registry(
        tmp_path, demo_root, backbone="test_efficientnet", head_conv=False))).channels[-1]
    images = _images(2)
    with torch.no_grad():
        deepest = net.forward_features(images, torch.tensor([0, 0]))[-1]
        expected = reference.forward_features(net.normalize(images))
    torch.testing.assert_close(deepest, expected)
    # the head convolution is one block: task_bn_blocks=1 branches it alone
    per_task = [m for m in net.modules() if isinstance(m, TaskBatchNorm)]
    assert len(per_task) == 1 and per_task[0] in list(net.trunk.blocks(4)[-1].modules())
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("conv_head.")}
    torch.save(state, weights)
    with pytest.raises(ConfigError, match="has no head convolution .*set head_conv: false"):
        MultiTaskNet(cfg)


def test_head_conv_loads_the_packaged_imagenet_weights_and_is_refused_where_there_is_none(tmp_path, demo_root):
    import timm

    from waterdrop.model.pretrained import load_packaged
    from waterdrop.model.trunk import Trunk

    trunk = Trunk("tf_efficientnet_lite0", "imagenet", head_conv=True).eval()
    reference = timm.create_model("tf_efficientnet_lite0").eval()
    reference.load_state_dict(load_packaged("tf_efficientnet_lite0", reference.state_dict()))
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(trunk(images)[-1], reference.forward_features(images))
    # ResNet has no head convolution; MobileNetV3's conv_head runs after pooling
    for backbone in ("test_resnet", "mobilenetv3_small_050"):
        with pytest.raises(ConfigError, match=f"head_conv: true needs .*{backbone} has none"):
            MultiTaskNet(load_registry(write_registry(tmp_path, demo_root, backbone=backbone, head_conv=True)))
        # auto: taken where the backbone has one (before pooling), else left out without a word
        assert not MultiTaskNet(load_registry(write_registry(tmp_path, demo_root, backbone=backbone,
                                                             head_conv="auto"))).trunk.head_conv
    auto = Trunk("tf_efficientnet_lite0", "imagenet", head_conv="auto").eval()
    assert auto.head_conv and auto.channels[-1] == 1280
    with torch.no_grad():
        torch.testing.assert_close(auto(images)[-1], reference.forward_features(images))
