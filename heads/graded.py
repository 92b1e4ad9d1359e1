"""Graded quality scores: ordinal regression over ordered grades (CORAL, Cao et al., 2020).

A sharpness or aesthetics score from 1 to 5 is neither five unrelated classes nor a
number: its grades are ordered. CORAL learns one shared score s(x) and K-1 ordered
biases; P(grade > k) = sigmoid(s(x) + b_k), trained with binary cross-entropy on the K-1
"above grade k" targets. The expected grade is the sum of those probabilities.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from waterdrop.model.head import Head, check_range, linear_map, pooled
from waterdrop.registry import register_head


@register_head
class GradedHead(Head):
    """``labels`` are the grades from lowest to highest (e.g. ``[blurry, soft, sharp]``); a
    sample carries exactly one. Outputs: ``prob`` (N, K-1) = P(grade above label k).

    Args:
        dropout: dropout before the score layer.
    """

    kind = "graded"
    cam_meaning = ("the shared score s(x) at each position (its spatial mean is s(x); P(grade above k) = "
                   "sigmoid(s(x) + b_k)); positive values push towards higher grades")

    def __init__(self, in_channels, labels, negative_label, *, dropout: float = 0.0):
        super().__init__(in_channels, labels, negative_label)
        if len(labels) < 2:
            raise ValueError("a graded task needs at least two grades in labels, lowest first")
        self.dropout = nn.Dropout(check_range("dropout", dropout, 0.0, 0.99))
        self.score = nn.Linear(in_channels[-1], 1, bias=False)
        self.boundaries = nn.Parameter(torch.linspace(1.0, -1.0, len(labels) - 1))

    def forward(self, feats):
        return {"logits": self.score(self.dropout(pooled(feats[-1]))) + self.boundaries}

    def cam(self, feats):
        return linear_map(self.score, feats[-1])[:, 0]

    def explain_targets(self):
        return [None]

    def target_score(self, outputs, target):
        """The shared score s(x): every boundary's logit minus its bias."""
        return outputs["logits"][:, 0] - self.boundaries[0]

    def loss(self, outputs, target):
        above = (target[:, None] > torch.arange(len(self.labels) - 1, device=target.device)).float()
        return {"loss_ordinal": F.binary_cross_entropy_with_logits(outputs["logits"], above,
                                                                   reduction="none").mean(dim=1)}

    def predict(self, outputs):
        return {"prob": torch.sigmoid(outputs["logits"])}

    def encode_target(self, names, missing):
        if missing or len(names) != 1:
            raise ValueError(f"a graded task needs exactly one grade per image (one of {', '.join(self.labels)}), "
                             f"got {names}" + (f" with missing {missing}" if missing else ""))
        self._check_known(names, self.labels)
        return np.int64(self.labels.index(names[0]))

    def score_and_truth(self, predictions, target):
        return predictions["prob"], target.astype(np.int64)
