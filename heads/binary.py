"""Binary moderation head, with optional sub-classes of the positive class."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from waterdrop.model.head import Head, check_range, pooled
from waterdrop.registry import register_head


@register_head
class BinaryHead(Head):
    """Positive vs normal, from the deepest feature level.

    With one label the head has one logit and a sigmoid. With several labels they are
    sub-classes of the positive class: the head classifies {normal, sub-classes...} with a
    softmax and P(positive) = 1 - P(normal). Sub-class labels help training even when
    only the binary decision ships.

    Args:
        dropout: dropout before the classifier, in [0, 1).
        label_smoothing: label smoothing of the cross-entropy, in [0, 0.5].
    """

    kind = "binary"

    def __init__(self, in_channels, labels, negative_label, *, dropout: float = 0.0, label_smoothing: float = 0.0):
        super().__init__(in_channels, labels, negative_label)
        self.dropout = nn.Dropout(check_range("dropout", dropout, 0.0, 0.99))
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 0.5)
        self.has_subclasses = len(labels) > 1
        self.fc = nn.Linear(in_channels[-1], len(labels) + 1 if self.has_subclasses else 1)

    def forward(self, feats):
        return {"logits": self.fc(self.dropout(pooled(feats[-1])))}

    def loss(self, outputs, target):
        logits = outputs["logits"]
        if self.has_subclasses:
            return {"loss_cls": F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)}
        positive = (target > 0).float()
        smoothed = positive * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        return {"loss_cls": F.binary_cross_entropy_with_logits(logits[:, 0], smoothed)}

    def predict(self, outputs):
        logits = outputs["logits"]
        if not self.has_subclasses:
            return {"prob": torch.sigmoid(logits[:, 0])}
        probs = logits.softmax(dim=1)
        return {"prob": 1 - probs[:, 0], "subclass_prob": probs[:, 1:]}

    def encode_target(self, names, missing):
        if missing:
            raise ValueError("a binary task cannot have missing labels")
        if len(names) != 1:
            raise ValueError(f"expected exactly one label ('{self.negative_label}' or one of the labels), got {names}")
        self._check_known(names, [self.negative_label, *self.labels])
        name = names[0]
        return np.int64(0 if name == self.negative_label else 1 + self.labels.index(name))

    def score_and_truth(self, predictions, target):
        return predictions["prob"], (target > 0).astype(np.int64)
