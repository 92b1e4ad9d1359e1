"""Loss functions shared by heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Element-wise focal loss on sigmoid outputs (Lin et al., 2017): ``-(1 - p_t)^gamma log p_t``.

    ``gamma`` = 0 is plain binary cross-entropy; larger values down-weight easy elements.
    """
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if gamma == 0:
        return ce
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    return ce * (1 - p_t).pow(gamma)
