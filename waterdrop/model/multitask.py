"""The multi-task network: trunk once, per-task BN branches, one head per task."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from waterdrop.config import ConfigError, ModelConfig, RegistryConfig
from waterdrop.model.head import Head
from waterdrop.model.loss_prediction import LossPredictionModule
from waterdrop.model.task_bn import TaskRouting, branch_norms
from waterdrop.model.trunk import Trunk
from waterdrop.registry import registered_heads
from waterdrop.weights import IMAGENET, PACKAGED


def cascade_weights(model: ModelConfig, backbone: str) -> Path | str | None:
    """The registry's pretrained weights when they fit the cascade's backbone (the same
    backbone, or packaged ImageNet weights that exist for it), else None (from scratch)."""
    if backbone == model.backbone:
        return model.pretrained
    if model.pretrained == IMAGENET and backbone in PACKAGED:
        return IMAGENET
    return None


class CascadeNet(nn.Module):
    """The second network of an OHEM cascade: its own trunk and a head of the task's type.

    It is trained only on the first network's hardest samples of each batch; at inference
    a task's decision is the AND of both networks (see ``MultiTaskNet.task_predictions``).
    Its trunk takes the registry's ``cbam`` and starts from ``pretrained`` (see
    ``cascade_weights``).
    """

    def __init__(self, backbone: str, head_class: type[Head], labels: list[str], negative_label: str,
                 head_args: dict, pretrained: Path | str | None = None, cbam: str = "none"):
        super().__init__()
        self.trunk = Trunk(backbone, pretrained, cbam)
        self.head = head_class(self.trunk.channels, labels, negative_label, **head_args)

    def features(self, normalized: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of every level of its own trunk."""
        feats, x = [], normalized
        for level in range(len(self.trunk.levels)):
            x = self.trunk.run_level(level, x)
            feats.append(x)
        return feats

    def forward(self, normalized: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.features(normalized))


class MultiTaskNet(nn.Module):
    """Shared trunk + per-task BatchNorm in the configured levels + one head per task.

    Inputs are RGB images, float or uint8 in 0..255, NCHW at the configured size;
    normalisation happens inside, so the exported graph carries it too.

    Two ways through:

    * ``forward_tasks(images, task_index)``: each sample goes through its own task only
      (training and validation); returns raw head outputs per task present in the batch.
    * ``forward_all(images)``: every image through every task in one graph (inference and
      ONNX export); returns the deploy outputs as ``{"<task>.<key>": tensor}``.

    A task with ``cascade`` in its YAML also has a ``CascadeNet`` in ``cascades``; a task with
    ``loss_prediction`` has a ``LossPredictionModule`` in ``loss_predictors``, which reads the
    task's own features (its BN branch) and adds ``predicted_loss`` to its outputs.

    With ``model.fusion`` a second backbone (``fusion``, with its own normalisation) runs on the
    image, and its deepest feature map (resized to the trunk's where the strides differ) is
    joined channel-wise to the trunk's deepest level: the heads read both (a fusion model,
    e.g. a teacher for distillation). It has no per-task BatchNorm. ``channels`` are the
    feature levels' channels as the heads see them.
    """

    def __init__(self, cfg: RegistryConfig):
        super().__init__()
        model = cfg.model
        self.task_names = cfg.task_names
        try:
            self.trunk = Trunk(model.backbone, model.pretrained, model.cbam)
        except ValueError as err:
            raise ConfigError(cfg.file, "model", str(err)) from err
        levels = len(self.trunk.levels)
        bad = [s for s in model.task_bn_stages if not -levels <= s < levels]
        if bad:
            raise ConfigError(cfg.file, "model.task_bn_stages",
                              f"got {bad}; {model.backbone} has feature levels 0..{levels - 1} (or -1..-{levels})")
        self.fusion = None
        self.channels = list(self.trunk.channels)
        if model.fusion is not None:
            try:
                self.fusion = Trunk(model.fusion.backbone, model.fusion.pretrained)
            except ValueError as err:
                raise ConfigError(cfg.file, "model.fusion", str(err)) from err
            self.channels[-1] += self.fusion.channels[-1]
            self.register_buffer("fusion_mean", torch.tensor(model.fusion.mean).view(1, 3, 1, 1) * 255,
                                 persistent=False)
            self.register_buffer("fusion_std", torch.tensor(model.fusion.std).view(1, 3, 1, 1) * 255,
                                 persistent=False)
        branched = sorted({s % levels for s in model.task_bn_stages})
        self.routing = TaskRouting(len(cfg.tasks))
        for level in branched:
            branch_norms(self.trunk.levels[level], self.routing)
        self.first_branched = branched[0] if branched else levels
        self.register_buffer("mean", torch.tensor(model.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(model.std).view(1, 3, 1, 1) * 255, persistent=False)
        head_classes = registered_heads()
        heads = {}
        for task in cfg.tasks:
            try:
                heads[task.name] = head_classes[task.head_type](
                    self.channels, task.labels, task.negative_label, **task.head_args)
            except (ValueError, TypeError) as err:
                raise ConfigError(task.file, "head", str(err)) from err
        self.heads = nn.ModuleDict(heads)
        self.cascades = nn.ModuleDict()
        for task in cfg.tasks:
            if task.cascade is None:
                continue
            if heads[task.name].kind != "binary":
                raise ConfigError(task.file, "cascade", f"needs a binary head; {task.head_type} is "
                                  f"{heads[task.name].kind}")
            try:
                self.cascades[task.name] = CascadeNet(
                    task.cascade.backbone, head_classes[task.head_type], task.labels, task.negative_label,
                    task.head_args, cascade_weights(model, task.cascade.backbone), model.cbam)
            except ValueError as err:
                raise ConfigError(task.file, "cascade.backbone", str(err)) from err
        self.loss_predictors = nn.ModuleDict()
        for task in cfg.tasks:
            if task.loss_prediction is None:
                continue
            spec = task.loss_prediction
            bad = [v for v in spec.levels if not -levels <= v < levels]
            chosen = [v % levels for v in spec.levels]
            if bad or len(set(chosen)) != len(chosen):
                raise ConfigError(task.file, "loss_prediction.levels",
                                  f"got {spec.levels}; {model.backbone} has feature levels 0..{levels - 1} (or "
                                  f"-1..-{levels}), each named once")
            self.loss_predictors[task.name] = LossPredictionModule(self.channels, chosen, spec.hidden,
                                                                   spec.detach)

    def backbones(self) -> list[nn.Module]:
        """The shared feature extractors: the trunk, and the fusion backbone where there is one."""
        return [self.trunk] if self.fusion is None else [self.trunk, self.fusion]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def fusion_map(self, images: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """The fusion backbone's deepest feature map of ``images``, resized to ``size`` where its
        stride differs from the trunk's."""
        x = (images.float() - self.fusion_mean) / self.fusion_std
        for level in range(len(self.fusion.levels)):
            x = self.fusion.run_level(level, x)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def forward_features(self, images: torch.Tensor, task_index: torch.Tensor | None) -> list[torch.Tensor]:
        """Feature maps of every level. With ``task_index`` None the levels from the first
        branched one on hold ``num_tasks`` stacked copies of the batch."""
        self.routing.task_index = task_index
        x = self.normalize(images)
        feats = []
        for level in range(len(self.trunk.levels)):
            if level == self.first_branched and task_index is None:
                x = x.unsqueeze(0).expand(len(self.task_names), *x.shape).flatten(0, 1)
            x = self.trunk.run_level(level, x)
            feats.append(x)
        if self.fusion is not None:
            extra = self.fusion_map(images, feats[-1].shape[-2:])
            if task_index is None and self.first_branched < len(self.trunk.levels):  # a stacked batch
                extra = extra.unsqueeze(0).expand(len(self.task_names), *extra.shape).flatten(0, 1)
            feats[-1] = torch.cat([feats[-1], extra], dim=1)
        return feats

    def forward_tasks(self, images: torch.Tensor, task_index: torch.Tensor,
                      with_cascade: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Raw outputs per task, rows in batch order of that task's samples. A cascade
        task's outputs hold its second network's outputs under ``cascade`` (unless
        ``with_cascade`` is False: training runs it on the hard samples only); a task with
        loss prediction holds its predicted loss (N,) under ``predicted_loss``."""
        feats = self.forward_features(images, task_index)
        outputs = {}
        for t, name in enumerate(self.task_names):
            rows = (task_index == t).nonzero(as_tuple=True)[0]
            if rows.numel():
                task_feats = [f[rows] for f in feats]
                outputs[name] = self.heads[name](task_feats)
                if name in self.loss_predictors:
                    outputs[name]["predicted_loss"] = self.loss_predictors[name](task_feats)
                if with_cascade and name in self.cascades:
                    outputs[name]["cascade"] = self.run_cascade(name, images[rows])
        return outputs

    def run_cascade(self, name: str, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.cascades[name](self.normalize(images))

    def task_predictions(self, name: str, outputs: dict) -> dict[str, torch.Tensor]:
        """Deploy outputs of one task. With a cascade, ``prob`` is the minimum of both
        networks' P(positive), so ``prob >= threshold`` is the AND of both decisions;
        ``stage1_prob`` and ``stage2_prob`` are kept for inspection."""
        predictions = self.heads[name].predict(outputs)
        if "cascade" in outputs:
            second = self.cascades[name].head.predict(outputs["cascade"])["prob"]
            predictions.update(stage1_prob=predictions["prob"], stage2_prob=second,
                               prob=torch.minimum(predictions["prob"], second))
        return predictions

    def scores_and_truth(self, outputs: dict[str, dict[str, torch.Tensor]],
                         targets: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """Evaluation arrays per task (see ``Head.score_and_truth``) from ``forward_tasks`` outputs."""
        arrays = {}
        for name, out in outputs.items():
            predictions = {k: v.detach().float().cpu().numpy() for k, v in self.task_predictions(name, out).items()}
            arrays[name] = self.heads[name].score_and_truth(predictions, targets[name].cpu().numpy())
        return arrays

    def features_per_task(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """Each task's feature maps of every level, without stacking the batch: the levels before
        the first branched one run once, the others once per task on the batch itself, with every
        branched BatchNorm set to that task's copy."""
        x, shared = self.normalize(images), []
        for level in range(self.first_branched):
            x = self.trunk.run_level(level, x)
            shared.append(x)
        per_task, extra = [], None
        try:
            for t in range(len(self.task_names)):
                self.routing.task_index = t
                feats, y = list(shared), x
                for level in range(self.first_branched, len(self.trunk.levels)):
                    y = self.trunk.run_level(level, y)
                    feats.append(y)
                if self.fusion is not None:  # its map is the same for every task: computed once
                    extra = self.fusion_map(images, feats[-1].shape[-2:]) if extra is None else extra
                    feats[-1] = torch.cat([feats[-1], extra], dim=1)
                per_task.append(feats)
        finally:
            self.routing.task_index = None
        return per_task

    def forward_all(self, images: torch.Tensor, stack_tasks: bool = True,
                    cams: bool = False) -> dict[str, torch.Tensor]:
        """Deploy outputs of every task for every image; ``<task>.predicted_loss`` (N,) for a
        task with loss prediction. With ``cams`` also ``<task>.cam`` for every task whose head
        gives a class activation map (``Head.cam``), and ``<task>.stage2_cam`` from a cascade
        task's second network.

        ``stack_tasks`` True: the levels from the first branched one run once, on the batch
        stacked once per task (``forward_features``). False: they run once per task on the batch
        itself (``features_per_task``); the same outputs. The ONNX export takes the second form:
        there each branched BatchNorm directly follows its convolution, so onnxruntime folds it
        into the convolution's weights, which it cannot do across the stacked batch's split.
        """
        if stack_tasks:
            feats, count = self.forward_features(images, None), len(self.task_names)
            per_task = [[f if level < self.first_branched else f.unflatten(0, (count, -1))[t]
                         for level, f in enumerate(feats)] for t in range(count)]
        else:
            per_task = self.features_per_task(images)
        results = {}
        for name, task_feats in zip(self.task_names, per_task):
            head = self.heads[name]
            outputs = head(task_feats)
            maps = {"cam": head.cam(task_feats) if cams else None}
            if name in self.cascades:
                # Its trunk runs once, for its outputs and its map.
                cascade = self.cascades[name]
                cascade_feats = cascade.features(self.normalize(images))
                outputs["cascade"] = cascade.head(cascade_feats)
                maps["stage2_cam"] = cascade.head.cam(cascade_feats) if cams else None
            for key, value in self.task_predictions(name, outputs).items():
                results[f"{name}.{key}"] = value
            if name in self.loss_predictors:
                results[f"{name}.predicted_loss"] = self.loss_predictors[name](task_feats)
            results.update((f"{name}.{key}", value) for key, value in maps.items() if value is not None)
        return results
