"""OHEM cascade: a second network per binary task, trained on the first network's hardest
samples; a task's decision is the AND of both networks.

Settings (task YAML ``cascade``, ``waterdrop.config.schema.CascadeConfig``): ``backbone`` of
the second network, ``hard_per_batch`` (how many of the task's labeled samples in a batch,
those with the highest first-network loss, train it) and ``loss_weight`` of its terms
(``<task>.cascade_<term>``).

Deploy outputs: ``prob`` is the minimum of both networks' P(positive), so ``prob >= threshold``
is the AND of both decisions; ``stage1_prob`` and ``stage2_prob`` are kept for inspection, and
the exported graph decides ``decision`` itself at the chosen threshold.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from waterdrop.config import ModelConfig, RegistryConfig, blamed_on
from waterdrop.features.base import LossBatch, TaskFeature, register_feature
from waterdrop.model.head import Head, mixed_terms
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
    """The second network of a cascade: its own trunk (with the registry's ``cbam``) and a
    head of the task's type, on the image normalised as the first network's."""

    def __init__(self, trunk: Trunk, head: Head):
        super().__init__()
        self.trunk, self.head = trunk, head


@register_feature
class Cascade(TaskFeature):
    key = "cascade"

    def __init__(self, cfg: RegistryConfig, net):
        super().__init__(cfg, net)
        head_classes = registered_heads()
        for task in cfg.tasks:
            spec = self.settings.get(task.name)
            if spec is None:
                continue
            with blamed_on(task.file, "cascade.backbone"):
                trunk = Trunk(spec.backbone, cascade_weights(cfg.model, spec.backbone), cfg.model.cbam)
            head = head_classes[task.head_type](trunk.channels, task.labels, task.negative_label, **task.head_args)
            self.per_task[task.name] = CascadeNet(trunk, head)
        self.register_buffer("mean", torch.tensor(cfg.model.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(cfg.model.std).view(1, 3, 1, 1) * 255, persistent=False)

    def renamed_state(self):
        return {"cascades.": "features.cascade.per_task."}

    def _run(self, task: str, images: torch.Tensor, cams: bool = False) -> tuple[dict, torch.Tensor | None]:
        second = self.per_task[task]
        feats = second.trunk((images.float() - self.mean) / self.std)
        return second.head(feats), second.head.cam(feats) if cams else None

    def add_outputs(self, task, feats, images, outputs, complete, cams):
        if task in self.per_task and complete:
            # Its trunk runs once, for its outputs and its map.
            outputs["cascade"], cam = self._run(task, images, cams)
            if cam is not None:
                outputs["stage2_cam"] = cam

    def adjust_predictions(self, task, outputs, predictions):
        if "cascade" not in outputs:
            return
        second = self.per_task[task].head.predict(outputs["cascade"])["prob"]
        predictions.update(stage1_prob=predictions["prob"], stage2_prob=second,
                           prob=torch.minimum(predictions["prob"], second))

    def deploy_outputs(self, task, outputs):
        return {"stage2_cam": outputs["stage2_cam"]} if "stage2_cam" in outputs else {}

    def graph_decisions(self, task, predictions, threshold):
        if task not in self.per_task:
            return {}
        return {"decision": predictions["prob"] >= float(threshold)}

    def metadata(self, task, output_shapes):
        if task not in self.per_task:
            return None
        return {"backbone": self.settings[task].backbone,
                "rule": "decision = stage1_prob >= threshold and stage2_prob >= threshold; "
                        "prob = min(stage1_prob, stage2_prob)"}

    def extra_cams(self, task):
        if task not in self.per_task:
            return {}
        return {"stage2": ("stage2_cam", self.per_task[task].trunk.reductions[-1])}

    def stages(self, task):
        return [(self.per_task[task].trunk, self.per_task[task].head)] if task in self.per_task else []

    def loss_terms(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        """The second network on the ``hard_per_batch`` labeled samples of each task with the
        highest first-network loss (OHEM)."""
        losses = {}
        for task, spec in self.settings.items():
            mask = batch.labeled.get(task)
            if task not in batch.outputs or not mask.any():
                continue
            hardness = batch.sample_losses[task].masked_fill(~mask, -math.inf)
            hard = hardness.topk(min(spec.hard_per_batch, int(mask.sum()))).indices
            mix = batch.mixes.get(task)
            outputs, _ = self._run(task, batch.images[batch.rows(task)[hard]])
            terms = mixed_terms(self.per_task[task].head, outputs, batch.targets[task][hard],
                                None if mix is None else (mix[0][hard], mix[1]))
            weight = self.loss_weights[task] * spec.loss_weight
            losses.update((f"{task}.cascade_{term}", per_sample.mean() * weight) for term, per_sample in terms.items())
        return losses
