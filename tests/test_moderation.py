"""The moderation recipes: sub-class loss, PCB, balanced sampling, augmentations, cutmix,
OHEM cascade, mean teacher, and their config errors."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.optim import OptimWrapper

from tests.conftest import edit_task
from waterdrop.config import AugmentConfig, ConfigError, config_to_dict, load_registry
from waterdrop.data.dataset import TrainTransform, distort_color, erase_random_rectangle, rotate
from waterdrop.data.sampler import BalancedStream, MultiTaskBatchSampler, PlainStream, WithUnlabeled
from waterdrop.engine.checkpoint import load_net
from waterdrop.engine.model import WaterdropModel
from waterdrop.engine.train import build_runner
from waterdrop.features.mean_teacher import rampup
from waterdrop.model.head import mixed_terms
from waterdrop.registry import registered_heads

BinaryHead = registered_heads()["BinaryHead"]
LABELS = ["a", "b", "c"]


def _feats(n, size=3, channels=4, seed=0):
    return [torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))]


# --- head and loss -------------------------------------------------------------------


def test_focal_softmax_is_focal_over_subclasses_plus_alpha_times_binary_softmax():
    head = BinaryHead([4], LABELS, "normal", alpha=2.0, gamma=2.0)
    logits = torch.tensor([[0.5, 2.0, -1.0, 0.0], [1.0, -2.0, -1.0, -3.0]])
    target = torch.tensor([1, 0])
    terms = head.loss({"logits": logits}, target)
    p = torch.sigmoid(logits[:, 1:])
    y = torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    p_t = p * y + (1 - p) * (1 - y)
    focal = (-(1 - p_t) ** 2 * torch.log(p_t)).sum(1)
    binary_logits = torch.stack([logits[:, 0], logits[:, 1:].logsumexp(1)], 1)
    binary = F.cross_entropy(binary_logits, torch.tensor([1, 0]), reduction="none")
    torch.testing.assert_close(terms["loss_focal"], focal)
    torch.testing.assert_close(terms["loss_binary"], 2.0 * binary)
    predictions = head.predict({"logits": logits})
    torch.testing.assert_close(predictions["prob"], torch.sigmoid(logits[:, 1:].logsumexp(1) - logits[:, 0]))
    torch.testing.assert_close(predictions["subclass_prob"], p)


def test_plain_softmax_ignores_subclasses_and_smoothing_softens_targets():
    head = BinaryHead([4], LABELS, "normal", loss="softmax")
    outputs = head(_feats(2))
    assert outputs["logits"].shape == (2, 2) and set(head.predict(outputs)) == {"prob"}
    confident = {"logits": torch.tensor([[-8.0, 8.0]])}
    sharp = head.loss(confident, torch.tensor([2]))["loss_cls"]
    smoothed = BinaryHead([4], LABELS, "normal", loss="softmax", label_smoothing=0.2).loss(
        confident, torch.tensor([2]))["loss_cls"]
    assert smoothed > sharp * 100
    with pytest.raises(ValueError, match="loss must be one of"):
        BinaryHead([4], LABELS, "normal", loss="hinge")


def test_pcb_takes_the_max_over_parts_and_can_join_the_global_branch():
    head = BinaryHead([4], LABELS, "normal", pcb={"size": 1, "stride": 1})
    with torch.no_grad():
        head.part_fc.weight.zero_()
        head.part_fc.bias.zero_()
        head.part_fc.weight[:, 0, 0, 0] = 1.0  # every logit reads channel 0 of its part
    feature = torch.zeros(1, 4, 3, 3)
    feature[0, 0, 2, 1] = 5.0  # one small offending region
    feature[0, 0, 0, 0] = -3.0
    logits = head([feature])["logits"]
    assert logits[0, 1:].tolist() == [5.0, 5.0, 5.0] and logits[0, 0] == -3.0
    joined = BinaryHead([4], LABELS, "normal", pcb={"size": 2, "stride": 1, "join_global": True})
    assert joined([feature])["logits"].shape == (1, 4) and joined.fc is not None
    with pytest.raises(ValueError, match="pcb.size 4 is larger than the final feature map"):
        BinaryHead([4], LABELS, "normal", pcb={"size": 4})([feature])
    with pytest.raises(ValueError, match="pcb must be null or a mapping"):
        BinaryHead([4], LABELS, "normal", pcb={"grid": 3})


# --- sampling ------------------------------------------------------------------------


def test_balanced_stream_gives_the_normal_fraction_and_even_subclasses():
    classes = np.array([0] * 100 + [1] * 50 + [2] * 5 + [3] * 1)
    stream = BalancedStream(classes, 2 / 3, np.random.default_rng(0))
    taken = np.concatenate([stream.take(9) for _ in range(300)])
    drawn = classes[taken]
    assert abs((drawn == 0).mean() - 2 / 3) < 0.02
    shares = [(drawn == c).sum() for c in (1, 2, 3)]
    assert max(shares) - min(shares) <= 1, shares  # rare sub-classes repeat instead of vanishing
    assert set(taken[drawn == 2]) == set(range(150, 155))
    first_pass = [classes_taken for classes_taken in taken[drawn == 1][:50]]
    assert sorted(first_pass) == list(range(100, 150))  # a pass over a class before any repeat


def test_unlabeled_share_and_per_task_streams_in_the_batch_sampler():
    stream = WithUnlabeled(PlainStream(np.arange(10), np.random.default_rng(0)), np.arange(10, 20), 0.25,
                           np.random.default_rng(1))
    taken = np.concatenate([stream.take(8) for _ in range(200)])
    assert abs((taken >= 10).mean() - 0.25) < 0.02
    classes = np.array([0] * 30 + [1] * 3)
    streams = [lambda rng: BalancedStream(classes, 0.5, rng), lambda rng: PlainStream(np.arange(40), rng)]
    sampler = MultiTaskBatchSampler([33, 40], 16, np.array([0.5, 0.5]), seed=0, streams=streams)
    first = list(sampler)
    task_a = np.concatenate([[i for i in batch if i < 33] for batch in first])
    assert 0.35 < (classes[task_a] == 0).mean() < 0.65
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_unlabeled_images_neither_weigh_in_task_sampling_nor_lengthen_the_epoch(registry_file, demo_root, tmp_path):
    edit_task(registry_file, "disgusting", data={"unlabeled": str(demo_root / "disgusting" / "unlabeled")},
              mean_teacher={"rampup_epochs": 1})
    runner = build_runner(load_registry(registry_file), tmp_path / "run", printer=lambda *a, **k: None)
    loader = runner.train_dataloader
    datasets = loader.dataset.datasets
    labeled = [d.labeled_count for d in datasets]
    assert len(datasets[0]) > labeled[0] + 10
    assert len(loader.batch_sampler) == math.ceil(sum(labeled) / 16)
    np.testing.assert_allclose(loader.batch_sampler.weights, np.array(labeled) / sum(labeled))


def test_balanced_sampler_needs_a_binary_head(registry_file):
    edit_task(registry_file, "scene_tags", sampler={"type": "balanced", "normal_fraction": 0.5})
    with pytest.raises(ConfigError, match="scene_tags.yaml: key 'sampler.type': balanced is not for multilabel "
                                          "tasks; they take: plain, repeat_factor"):
        load_registry(registry_file)


# --- augmentation --------------------------------------------------------------------


def test_each_augmentation_changes_pixels_but_not_shape():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for augmented in (rotate(image, 20), distort_color(image, 0.4), erase_random_rectangle(image)):
        assert augmented.shape == image.shape and augmented.dtype == np.uint8
        assert not np.array_equal(augmented, image)
    full = TrainTransform(32, AugmentConfig(crop_scale=(0.5, 1.0), hflip=True, rotation=30, color=0.3, erasing=1.0))
    outputs = []
    for _ in range(2):
        random.seed(3)
        outputs.append(full(image))
    assert outputs[0].shape == (32, 32, 3) and np.array_equal(outputs[0], outputs[1])  # seeded, so reproducible


def test_cutmix_pastes_a_rectangle_and_weighs_both_targets_by_area(registry_file):
    edit_task(registry_file, "disgusting", augment={"cutmix": 1.0})
    model = WaterdropModel(load_registry(registry_file))
    images = torch.arange(4, dtype=torch.float).view(4, 1, 1, 1).expand(4, 3, 32, 32).clone()
    targets = {"disgusting": torch.tensor([0, 1, 2, 3])}
    torch.manual_seed(1)
    mixed, mixes, _ = model._cutmix(images, torch.tensor([0, 0, 0, 0]), targets, {})
    second_target, lam = mixes["disgusting"]
    for row in range(4):
        values = mixed[row, 0].unique().tolist()
        pasted = (mixed[row, 0] != row).float().mean().item()
        source = int(second_target[row])  # the pasted image's own label equals its value here
        assert set(values) <= {float(row), float(source)}
        assert pasted == pytest.approx(0 if source == row else 1 - lam, abs=1e-6)
    head = model.net.heads["disgusting"]
    outputs = head(_feats(4, channels=head.in_channels[-1]))
    terms = mixed_terms(head, outputs, targets["disgusting"], (second_target, lam))
    first, second = head.loss(outputs, targets["disgusting"]), head.loss(outputs, second_target)
    torch.testing.assert_close(terms["loss_focal"], lam * first["loss_focal"] + (1 - lam) * second["loss_focal"])


# --- OHEM cascade --------------------------------------------------------------------


def test_cascade_trains_on_the_highest_loss_samples_only(registry_file):
    edit_task(registry_file, "disgusting", cascade={"backbone": "test_resnet", "hard_per_batch": 2})
    model = WaterdropModel(load_registry(registry_file))
    per_sample = torch.tensor([0.1, 3.0, 0.2, 2.0, 0.3])
    model.net.heads["disgusting"].loss = lambda outputs, target: {"loss_cls": per_sample * outputs["logits"].sum() * 0
                                                                 + per_sample}
    seen = []
    cascade = model.net.features["cascade"]
    original = cascade._run
    cascade._run = lambda task, images, cams=False: seen.append(images[:, 0, 0, 0].tolist()) or original(task, images)
    images = torch.arange(5, dtype=torch.float).view(5, 1, 1, 1).expand(5, 3, 64, 64).clone()
    losses = model(images, torch.zeros(5, dtype=torch.long), {"disgusting": torch.tensor([0, 1, 0, 2, 0])},
                   mode="loss")
    assert sorted(seen[0]) == [1.0, 3.0]
    assert "disgusting.cascade_loss_focal" in losses and torch.isfinite(losses["disgusting.cascade_loss_focal"])


def test_cascade_needs_a_binary_head(registry_file):
    edit_task(registry_file, "scene_tags", cascade={"backbone": "test_resnet"})
    with pytest.raises(ConfigError, match="scene_tags.yaml: key 'cascade': needs a binary head"):
        WaterdropModel(load_registry(registry_file))


# --- mean teacher --------------------------------------------------------------------


def test_mean_teacher_ema_consistency_and_unlabeled_masking(registry_file, tmp_path):
    edit_task(registry_file, "disgusting", mean_teacher={"ema_decay": 0.9, "rampup_epochs": 0})
    cfg = load_registry(registry_file)
    model = WaterdropModel(cfg)
    teacher = model.features["mean_teacher"].teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    assert model.deployed is teacher and model.deployed_prefix() == "features.mean_teacher.teacher."
    images = torch.randint(0, 256, (4, 3, 64, 64), generator=torch.Generator().manual_seed(0)).float()
    batch = {"inputs": images, "inputs2": images.flip(3), "task_index": torch.zeros(4, dtype=torch.long),
             "targets": {"disgusting": torch.tensor([1, 0, 0, 0])},
             "labeled": {"disgusting": torch.tensor([True, True, False, False])}}
    model.eval()  # no BN or dropout noise, so losses can be compared exactly
    losses = model(**batch, mode="loss")
    assert losses["disgusting.loss_consistency"] > 0
    alone = model(images[:2], batch["task_index"][:2], {"disgusting": torch.tensor([1, 0])}, mode="loss")
    torch.testing.assert_close(losses["disgusting.loss_focal"], alone["disgusting.loss_focal"])

    model.train()
    teacher_before = [p.clone() for p in teacher.parameters()]
    wrapper = OptimWrapper(torch.optim.SGD(model.net.parameters(), lr=0.1))
    model.train_step(batch, wrapper)
    decay = min(0.9, 2 / 11)
    for before, after, student in zip(teacher_before, teacher.parameters(), model.net.parameters()):
        torch.testing.assert_close(after, decay * before + (1 - decay) * student, atol=1e-6, rtol=1e-5)
    checkpoint = tmp_path / "epoch_1.pth"
    torch.save({"state_dict": model.state_dict(),
                "meta": {"waterdrop": {"config": config_to_dict(load_registry(registry_file)),
                                       "deployed": model.deployed_prefix()}}}, checkpoint)
    net, _, _ = load_net(checkpoint)
    torch.testing.assert_close(next(net.parameters()), next(teacher.parameters()))


def test_rampup_goes_from_near_zero_to_one():
    assert rampup(0, 3) == pytest.approx(math.exp(-5))
    assert rampup(1.5, 3) == pytest.approx(math.exp(-1.25))
    assert rampup(5, 3) == 1.0 and rampup(0, 0) == 1.0


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"data": {"unlabeled": "x"}}, "data.unlabeled", "only used by mean_teacher"),
        ({"mean_teacher": {}, "augment": {"cutmix": 0.5}}, "augment.cutmix", "cannot be combined"),
        ({"sampler": {"type": "even"}}, "sampler.type", "plain, balanced"),
        ({"sampler": {"type": "balanced", "normal_fraction": 1.5}}, "sampler.normal_fraction", "<= 1"),
        ({"augment": {"rotation": 200}}, "augment.rotation", "<= 180"),
        ({"cascade": {"hard_per_batch": 4}}, "cascade.backbone", "missing"),
        ({"mean_teacher": {"ema_decay": 0}}, "mean_teacher.ema_decay", "> 0"),
    ],
)
def test_recipe_config_errors_name_the_key(registry_file, changes, key, words):
    edit_task(registry_file, "disgusting", **changes)
    with pytest.raises(ConfigError) as err:
        load_registry(registry_file)
    assert f"key '{key}'" in str(err.value) and words in str(err.value)


def test_teachers_of_two_tasks_must_agree(registry_file):
    edit_task(registry_file, "disgusting", mean_teacher={"ema_decay": 0.9})
    edit_task(registry_file, "thriller", mean_teacher={"ema_decay": 0.99})
    with pytest.raises(ConfigError, match="ema_decay differs between tasks"):
        load_registry(registry_file)
