"""Knowledge distillation: the divergences, the teacher's checks, and a teacher that is never saved."""

import math
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.conftest import edit_task, edit_train, write_registry
from waterdrop.config import ConfigError, config_to_dict, load_registry
from waterdrop.data.dataset import collate
from waterdrop.data.loaders import DataNeeds, task_dataset
from waterdrop.engine.model import WaterdropModel
from waterdrop.engine.train import run_training
from waterdrop.features.distillation import Distillation, bernoulli_kl, divergence, soft_probabilities
from waterdrop.model.multitask import MultiTaskNet


def _teacher_checkpoint(folder, data_root, seed=1, **model) -> str:
    """A checkpoint as training writes it (config snapshot + ``net.`` weights), of an untrained net."""
    cfg = load_registry(write_registry(folder, data_root, **model))
    torch.manual_seed(seed)
    net = MultiTaskNet(cfg)
    checkpoint = folder / "teacher.pth"
    torch.save({"meta": {"waterdrop": {"config": config_to_dict(cfg)}},
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, checkpoint)
    return str(checkpoint)


def _batch(seed=0):
    images = torch.randint(0, 256, (6, 3, 64, 64), generator=torch.Generator().manual_seed(seed)).float()
    tags = torch.zeros(2, 10)
    tags[0, 0] = 1
    return images, torch.tensor([0, 0, 1, 1, 2, 2]), {"disgusting": torch.tensor([0, 2]),
                                                      "thriller": torch.tensor([1, 0]), "scene_tags": tags}


def test_divergences_on_hand_made_numbers():
    p, q = torch.tensor([[0.9, 0.5]]), torch.tensor([[0.6, 0.5]])
    kl = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    assert bernoulli_kl(p, q)[0, 0].item() == pytest.approx(kl, rel=1e-5)
    assert divergence(p, q, "kl").item() == pytest.approx(kl / 2, rel=1e-5)  # mean over the two entries
    m = 0.75
    js = (0.9 * math.log(0.9 / m) + 0.1 * math.log(0.1 / 0.25)
          + 0.6 * math.log(0.6 / m) + 0.4 * math.log(0.4 / 0.25)) / 2
    assert divergence(p, q, "js").item() == pytest.approx(js / 2, rel=1e-5)
    assert divergence(q, p, "js").item() == pytest.approx(divergence(p, q, "js").item())  # symmetric
    assert divergence(p, p, "js").item() == pytest.approx(0.0, abs=1e-7)
    # JS is bounded by log 2 where KL is not: a confidently wrong teacher cannot dominate.
    sure, wrong = torch.tensor([[1.0]]), torch.tensor([[0.0]])
    assert divergence(sure, wrong, "js").item() == pytest.approx(math.log(2), rel=1e-3)
    assert divergence(sure, wrong, "kl").item() > 10


def test_temperature_softens_the_logits_of_every_head_kind(registry_file):
    net = MultiTaskNet(load_registry(registry_file)).eval()
    feats = net.features_per_task(torch.zeros(2, 3, 64, 64) + 100)
    for t, name in enumerate(net.task_names):
        head = net.heads[name]
        outputs = head(feats[t])
        soft = soft_probabilities(head, outputs, 4.0)
        expected = head.predict(dict(outputs, logits=outputs["logits"] / 4.0))
        assert torch.allclose(soft["prob"], expected["prob"].reshape(2, -1))  # a detector's assist is not taught
        if "subclass_prob" in expected:
            assert torch.allclose(soft["subclass_prob"], expected["subclass_prob"])


def test_student_gets_a_term_per_task_and_never_holds_the_teacher(registry_file, tmp_path, demo_root):
    teacher = _teacher_checkpoint(tmp_path / "teacher", demo_root, input_size=96)  # resized to its own size
    plain = WaterdropModel(load_registry(registry_file))
    edit_train(registry_file, distillation={"teacher": teacher, "weight": 0.5, "temperature": 2.0,
                                            "tasks": {"thriller": {"weight": 0}}})
    model = WaterdropModel(load_registry(registry_file)).train()
    distillation = model.features["distillation"]
    teacher_buffers = [b.clone() for b in distillation.teacher.buffers()]
    losses = model(*_batch(), mode="loss")
    # The teacher stays in eval mode: its BatchNorm statistics do not follow the student's batches.
    assert all(torch.equal(a, b) for a, b in zip(teacher_buffers, distillation.teacher.buffers()))
    assert {k for k in losses if "distill" in k} == {"disgusting.loss_distill", "scene_tags.loss_distill"}
    assert all(losses[k] > 0 for k in ("disgusting.loss_distill", "scene_tags.loss_distill"))
    sum(v for k, v in losses.items() if "loss" in k).backward()
    assert all(p.grad is None for p in distillation.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.heads["disgusting"].parameters())
    # Not a sub-module: not in the state dict, so not in checkpoints or exports.
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all("distillation" not in k for k in model.state_dict())
    assert distillation.teacher not in list(model.modules())


def test_term_matches_the_divergence_of_both_networks_by_hand(registry_file, tmp_path, demo_root):
    teacher = _teacher_checkpoint(tmp_path / "teacher", demo_root)
    for kind in ("js", "kl"):
        edit_train(registry_file, distillation={"teacher": teacher, "divergence": kind, "weight": 3.0,
                                                "temperature": 2.0})
        edit_task(registry_file, "disgusting", loss_weight=0.5)
        model = WaterdropModel(load_registry(registry_file)).eval()
        images, task_index, targets = _batch()
        losses = model(images, task_index, targets, mode="loss")
        rows = slice(0, 2)
        with torch.no_grad():
            ours = model.net.heads["disgusting"](model.net.features_per_task(images[rows])[0])
            theirs_net = model.features["distillation"].teacher
            theirs = theirs_net.heads["disgusting"](theirs_net.features_per_task(images[rows])[0])
        p = soft_probabilities(theirs_net.heads["disgusting"], theirs, 2.0)
        q = soft_probabilities(model.net.heads["disgusting"], ours, 2.0)
        # The mean of the two groups: the decision and the sub-classes.
        expected = (divergence(p["prob"], q["prob"], kind)
                    + divergence(p["subclass_prob"], q["subclass_prob"], kind)) / 2
        expected = expected.mean() * 4.0 * 3.0 * 0.5
        assert losses["disgusting.loss_distill"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_teacher_of_other_tasks_or_labels_is_refused_with_the_reason(registry_file, tmp_path, demo_root):
    teacher = _teacher_checkpoint(tmp_path / "teacher", demo_root)
    labels = yaml.safe_load((registry_file.parent / "tasks" / "thriller.yaml").read_text())["labels"]
    edit_task(registry_file, "thriller", labels=labels[:-1])
    edit_train(registry_file, distillation={"teacher": teacher})
    with pytest.raises(ConfigError, match="task 'thriller' differs in the teacher"):
        WaterdropModel(load_registry(registry_file))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    edit_train(registry_file, distillation={"teacher": str(garbage)})
    with pytest.raises(ConfigError, match="train.distillation.teacher.*not a readable waterdrop checkpoint"):
        WaterdropModel(load_registry(registry_file))
    for size in (0, 100):  # empty, and cut off early as by a full disk
        truncated = tmp_path / f"truncated_{size}.pth"
        truncated.write_bytes(Path(teacher).read_bytes()[:size])
        edit_train(registry_file, distillation={"teacher": str(truncated)})
        with pytest.raises(ConfigError, match="train.distillation.teacher.*not a readable waterdrop checkpoint"):
            WaterdropModel(load_registry(registry_file))
    edit_train(registry_file, distillation={"teacher": teacher, "weight": 0})
    with pytest.raises(ConfigError, match="teaches no task"):
        load_registry(registry_file)
    edit_train(registry_file, distillation={"teacher": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="train.distillation.teacher.*existing run folder or checkpoint"):
        load_registry(registry_file)
    edit_train(registry_file, distillation={"teacher": teacher, "tasks": {"horror": {"weight": 1}}})
    with pytest.raises(ConfigError, match="train.distillation.tasks.horror.*unknown task"):
        load_registry(registry_file)
    edit_train(registry_file, distillation={"teacher": teacher, "divergence": "mse"})
    with pytest.raises(ConfigError, match="divergence.*js, kl"):
        load_registry(registry_file)


def test_a_distilled_run_checkpoints_no_teacher_and_leaves_it_unchanged(registry_file, tmp_path, demo_root):
    teacher = _teacher_checkpoint(tmp_path / "teacher", demo_root)
    before = torch.load(teacher, weights_only=True)["state_dict"]
    edit_train(registry_file, distillation={"teacher": teacher, "divergence": "js"})
    run_training(registry_file, tmp_path / "run", printer=lambda *a, **k: None)
    state = torch.load(tmp_path / "run" / "epoch_1.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert all(k.startswith(("net.", "weighting.")) for k in state)
    assert sum(v.numel() for v in state.values()) == sum(v.numel() for v in before.values())
    assert all(torch.equal(v, torch.load(teacher, weights_only=True)["state_dict"][k]) for k, v in before.items())
    with open(tmp_path / "run" / "results.csv") as f:
        header = f.readline()
    assert "disgusting.loss_distill" in header


def test_a_larger_teacher_sees_the_same_crop_at_its_own_size(registry_file, tmp_path, demo_root):
    teacher = _teacher_checkpoint(tmp_path / "teacher", demo_root, input_size=96)
    edit_train(registry_file, distillation={"teacher": teacher})
    cfg = load_registry(registry_file)
    net = MultiTaskNet(cfg)
    random.seed(0)
    dataset = task_dataset(cfg, net, 0, "train", augment=True, needs=DataNeeds(view_size=96))
    samples = [dataset[i] for i in range(3)]
    for sample in samples:
        assert sample["image"].shape == (3, 64, 64) and sample["large_image"].shape == (3, 96, 96)
        shrunk = cv2.resize(sample["large_image"].transpose(1, 2, 0), (64, 64), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(shrunk.transpose(2, 0, 1), sample["image"])
    assert collate(samples, cfg.task_names)["large_inputs"].shape == (3, 3, 96, 96)
    smaller = task_dataset(cfg, net, 0, "train", augment=True, needs=DataNeeds(view_size=48))[0]
    assert "large_image" not in smaller and smaller["image"].shape == (3, 64, 64)
    # A task the teacher does not teach has no view; its row of the batch is a blank, never read.
    untaught = task_dataset(cfg, net, 1, "train", augment=True)[0]
    mixed = collate([samples[0], untaught], cfg.task_names)["large_inputs"]
    assert mixed.shape == (2, 3, 96, 96) and not mixed[1].any()
    # A training run hands the views to the teacher.
    seen = []
    original = Distillation.loss_terms

    def recording(self, batch):
        views = batch.extras.get("large_inputs")
        seen.append(None if views is None else tuple(views.shape[-2:]))
        return original(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Distillation, "loss_terms", recording)
        run_training(registry_file, tmp_path / "run", printer=lambda *a, **k: None)
    assert seen and set(seen) == {(96, 96)}


def test_the_teacher_scores_its_own_views_and_cutmix_pastes_the_same_rectangle(registry_file, tmp_path, demo_root):
    teacher = _teacher_checkpoint(tmp_path / "teacher", demo_root, input_size=96)
    edit_train(registry_file, distillation={"teacher": teacher, "temperature": 2.0})
    model = WaterdropModel(load_registry(registry_file)).eval()
    images, task_index, targets = _batch()
    views = torch.randint(0, 256, (6, 3, 96, 96), generator=torch.Generator().manual_seed(5)).float()
    losses = model(images, task_index, targets, mode="loss", large_inputs=views)
    with torch.no_grad():
        ours = model.net.heads["disgusting"](model.net.features_per_task(images[:2])[0])
        theirs_net = model.features["distillation"].teacher
        theirs = theirs_net.heads["disgusting"](theirs_net.features_per_task(views[:2])[0])
    p = soft_probabilities(theirs_net.heads["disgusting"], theirs, 2.0)
    q = soft_probabilities(model.net.heads["disgusting"], ours, 2.0)
    expected = (divergence(p["prob"], q["prob"], "js") + divergence(p["subclass_prob"], q["subclass_prob"], "js")) / 2
    assert losses["disgusting.loss_distill"].item() == pytest.approx((expected.mean() * 4.0).item(), rel=1e-4)
    assert model(images, task_index, targets, mode="loss")["disgusting.loss_distill"].item() != pytest.approx(
        losses["disgusting.loss_distill"].item(), rel=1e-3)  # without views the teacher sees the batch resized
    # Cutmix: six images of one task, each one grey level, in both sizes. Every row gets the
    # same donor in both views, over the same share and at the same place.
    model.tasks["disgusting"].augment.cutmix = 1.0
    levels = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1) * 40
    same_task, targets = torch.zeros(6, dtype=torch.long), {"disgusting": torch.tensor([0, 1, 2, 0, 1, 2])}
    torch.manual_seed(3)
    mixed, mixes, extras = model._cutmix(levels.expand(6, 3, 64, 64), same_task, targets,
                                         {"large_inputs": levels.expand(6, 3, 96, 96)})
    mixed_views = extras["large_inputs"]
    assert "disgusting" in mixes
    shrunk = F.interpolate(mixed_views, size=(64, 64), mode="nearest")
    pasted = []
    for row in range(6):
        small, large = mixed[row, 0], mixed_views[row, 0]
        assert set(small.unique().tolist()) == set(large.unique().tolist())
        share = (small != levels[row, 0, 0, 0]).float().mean().item()
        assert (large != levels[row, 0, 0, 0]).float().mean().item() == pytest.approx(share, abs=0.04)
        assert (shrunk[row, 0] == small).float().mean().item() > 0.95  # the same place, up to its edges
        pasted.append(share)
    assert sum(share > 0 for share in pasted) >= 4  # rows that drew themselves as donor keep their level


def test_positive_congruent_terms_weigh_what_the_teacher_gets_right(registry_file, tmp_path, demo_root):
    teacher = _teacher_checkpoint(tmp_path / "teacher", demo_root)
    images, task_index, targets = _batch()
    rows = slice(0, 2)
    edit_train(registry_file, distillation={"teacher": teacher, "positive_congruent": True, "congruent_weight": 4.0})
    with pytest.raises(ConfigError, match="positive_congruent.*has no thresholds for disgusting"):
        WaterdropModel(load_registry(registry_file))
    checkpoint = torch.load(teacher, weights_only=True)
    with torch.no_grad():
        net = MultiTaskNet(load_registry(registry_file)).eval()
        net.load_state_dict({k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()})
        first = net.forward_all(images[rows])["disgusting.prob"]
    # A threshold below both scores: both decided positive, so the teacher is right on exactly one
    # (targets: sample 0 normal, sample 1 positive).
    threshold = float(first.min()) - 1e-3
    right = [bool(first[0] < threshold), bool(first[1] >= threshold)]
    checkpoint["meta"]["waterdrop"]["thresholds"] = {"disgusting": threshold, "thriller": 0.5,
                                                    "scene_tags": {t: 0.5 for t in net.heads["scene_tags"].labels}}
    torch.save(checkpoint, teacher)
    model = WaterdropModel(load_registry(registry_file)).eval()
    losses = model(images, task_index, targets, mode="loss")
    with torch.no_grad():
        ours = model.net.heads["disgusting"](model.net.features_per_task(images[rows])[0])
        theirs_net = model.features["distillation"].teacher
        theirs = theirs_net.heads["disgusting"](theirs_net.features_per_task(images[rows])[0])
    p = soft_probabilities(theirs_net.heads["disgusting"], theirs, 1.0)
    q = soft_probabilities(model.net.heads["disgusting"], ours, 1.0)
    per_sample = (divergence(p["prob"], q["prob"], "js") + divergence(p["subclass_prob"], q["subclass_prob"], "js")) / 2
    weights = torch.tensor([1 + 4.0 * r for r in right])
    assert sorted(right) == [False, True]
    assert losses["disgusting.loss_distill"].item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-4)
