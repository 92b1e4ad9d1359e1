"""Loss prediction (Yoo and Kweon, "Learning Loss for Active Learning", CVPR 2019).

A small network beside a task's head that predicts, from the task's feature maps, the loss
the head would have on an image. Unlabeled images with the highest predicted loss are the
ones worth labeling next (``waterdrop.curation.selection``). It is trained with the paper's
pairwise ranking loss: only the order of two samples' losses is learned, not their scale,
because the scale of the head's loss drifts as training goes on.

Settings (task YAML ``loss_prediction``, ``waterdrop.config.schema.LossPredictionConfig``):
the feature ``levels`` it reads, the ``hidden`` width, the ranking ``margin``, its
``loss_weight`` (term ``<task>.loss_lossprediction``) and ``detach``. The deploy output is
``<task>.predicted_loss`` (N,).
"""

from __future__ import annotations

import torch
from torch import nn

from waterdrop.config import RegistryConfig, blamed_on
from waterdrop.config.schema import check_levels
from waterdrop.features.base import LossBatch, TaskFeature, register_feature
from waterdrop.model.head import pooled


class LossPredictionModule(nn.Module):
    """Per chosen feature level: global average pool -> Linear -> ReLU to ``hidden``; the
    levels are concatenated and a Linear gives one scalar per sample, the predicted loss.

    Args:
        in_channels: channels of every trunk feature level, shallow to deep.
        levels: indices of the levels it reads (already checked and made non-negative).
        hidden: width of each level's projection.
        detach: stop gradients at the features it reads (see ``forward``).
    """

    def __init__(self, in_channels: list[int], levels: list[int], hidden: int, detach: bool = True):
        super().__init__()
        self.levels = list(levels)
        self.detach = detach
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Linear(in_channels[level], hidden), nn.ReLU(inplace=True)) for level in self.levels
        )
        self.out = nn.Linear(hidden * len(self.levels), 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Predicted loss (N,) from a task's feature maps (every level, shallow to deep)."""
        pooled_levels = []
        for level, projection in zip(self.levels, self.projections):
            feature = feats[level]
            if self.detach:
                # Its ranking loss would otherwise pull the shared trunk and the task's BN
                # branch towards features that predict loss well, which is not what the task
                # needs; early in training that hurts the task (the paper stops this gradient
                # too). Detached, the module is a pure observer: the task trains as without it.
                feature = feature.detach()
            pooled_levels.append(projection(pooled(feature)))
        return self.out(torch.cat(pooled_levels, dim=1)).squeeze(1)


def ranking_loss(predicted: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """The paper's pairwise ranking loss, averaged over pairs.

    Samples are paired in the order given: sample k with sample ``half + k`` (``half`` = N // 2;
    with an odd N the last sample is left out), so shuffle first for random pairs. For a pair
    (i, j) the loss is ``max(0, -sign(l_i - l_j) * (p_i - p_j) + margin)``: the predicted losses
    ``p`` must be ordered like the true losses ``l``, by at least ``margin``. A pair with equal
    true losses costs ``margin`` and gives no gradient.

    Args:
        predicted: predicted losses (N,), N >= 2.
        target: the true per-sample losses (N,); treated as constants.
        margin: the required gap between the two predictions of a pair.
    """
    half = len(predicted) // 2
    if half == 0:
        raise ValueError("the ranking loss needs at least two samples")
    p_i, p_j = predicted[:half], predicted[half : 2 * half]
    l_i, l_j = target[:half].detach(), target[half : 2 * half].detach()
    return torch.clamp(-torch.sign(l_i - l_j) * (p_i - p_j) + margin, min=0).mean()


@register_feature
class LossPrediction(TaskFeature):
    key = "loss_prediction"

    def __init__(self, cfg: RegistryConfig, net):
        super().__init__(cfg, net)
        for task in cfg.tasks:
            spec = self.settings.get(task.name)
            if spec is None:
                continue
            with blamed_on(task.file, "loss_prediction.levels"):
                levels = check_levels(spec.levels, len(net.channels), distinct=True)
            self.per_task[task.name] = LossPredictionModule(net.channels, levels, spec.hidden, spec.detach)

    def renamed_state(self):
        return {"loss_predictors.": "features.loss_prediction.per_task."}

    def add_outputs(self, task, feats, images, outputs, complete, cams):
        if task in self.per_task:
            outputs["predicted_loss"] = self.per_task[task](feats)

    def deploy_outputs(self, task, outputs):
        return {"predicted_loss": outputs["predicted_loss"]} if "predicted_loss" in outputs else {}

    def metadata(self, task, output_shapes):
        if task not in self.per_task:
            return None
        return {"levels": self.per_task[task].levels,
                "meaning": "predicted_loss: the loss the task's head is predicted to have on the image (Yoo and "
                           "Kweon, 2019); only its order is meaningful: label the images with the highest first"}

    def loss_terms(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        """The ranking loss over the task's labeled samples of the batch (two at least)."""
        losses = {}
        for task, spec in self.settings.items():
            mask = batch.labeled.get(task)
            if task not in batch.outputs or int(mask.sum()) < 2:
                continue
            predicted, true_loss = batch.outputs[task]["predicted_loss"][mask], batch.sample_losses[task][mask]
            # The batch's order follows the task's sampler, which may group samples (a balanced
            # sampler puts normal images first); random pairs avoid pairing by group.
            order = torch.randperm(len(predicted), device=predicted.device)
            loss = ranking_loss(predicted[order], true_loss[order], spec.margin)
            losses[f"{task}.loss_lossprediction"] = loss * spec.loss_weight * self.loss_weights[task]
        return losses
