"""Loss prediction module (Yoo and Kweon, "Learning Loss for Active Learning", CVPR 2019).

A small network beside a task's head that predicts, from the trunk's features, the loss the
head would have on an image. Unlabeled images with the highest predicted loss are the ones
worth labeling next (``waterdrop.curation.selection``). It is trained with the paper's
pairwise ranking loss: only the order of two samples' losses is learned, not their scale,
because the scale of the head's loss drifts as training goes on.
"""

from __future__ import annotations

import torch
from torch import nn

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
