"""Multi-label tag head: one independent binary decision per label (a detector can assist it:
``waterdrop.features.detector``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from waterdrop.model.head import Head, check_range, linear_map, pooled
from waterdrop.model.losses import sigmoid_focal
from waterdrop.registry import register_head


@register_head
class MultiLabelHead(Head):
    """Per-label sigmoid outputs with binary cross-entropy or focal loss.

    A label listed under ``missing`` in a manifest line is unknown for that image: it is
    masked out of the loss instead of being taken as a negative.

    Args:
        loss: ``bce`` or ``focal`` (sigmoid focal loss, which down-weights the many easy
            negatives of rare labels).
        gamma: focal exponent, used with ``loss: focal``.
        dropout: dropout before the classifier, in [0, 1).
    """

    kind = "multilabel"
    cam_meaning = ("one map per label: the tag logit at each position (its spatial mean is the tag logit); "
                   "the detector is not part of it")

    def __init__(self, in_channels, labels, negative_label, *, loss: str = "bce", gamma: float = 2.0,
                 dropout: float = 0.0):
        super().__init__(in_channels, labels, negative_label)
        if loss not in ("bce", "focal"):
            raise ValueError(f"loss must be bce or focal, got {loss!r}")
        self.gamma = check_range("gamma", gamma, 0.0, 10.0) if loss == "focal" else 0.0
        self.dropout = nn.Dropout(check_range("dropout", dropout, 0.0, 0.99))
        self.fc = nn.Linear(in_channels[-1], len(labels))

    def forward(self, feats):
        return {"logits": self.fc(self.dropout(pooled(feats[-1])))}

    def cam(self, feats):
        return linear_map(self.fc, feats[-1])

    def explain_targets(self):
        return list(self.labels)

    def target_score(self, outputs, target):
        """The tag logit of label ``target`` (before any fusion with the detector)."""
        return outputs["logits"][:, self.labels.index(target)]

    def loss(self, outputs, target):
        known = (target >= 0).float()
        per_label = sigmoid_focal(outputs["logits"], target.clamp(min=0), self.gamma)
        return {"loss_cls": (per_label * known).sum(dim=1) / known.sum(dim=1).clamp(min=1)}

    def predict(self, outputs):
        return {"prob": torch.sigmoid(outputs["logits"])}

    def encode_target(self, names, missing):
        self._check_known(names, self.labels)
        self._check_known(missing, self.labels)
        both = sorted(set(names) & set(missing))
        if both:
            raise ValueError(f"labels {both} are listed both as present and as missing")
        target = np.zeros(len(self.labels), dtype=np.float32)
        target[[self.labels.index(n) for n in names]] = 1
        target[[self.labels.index(n) for n in missing]] = -1
        return target

    def score_and_truth(self, predictions, target):
        return predictions["prob"], target.astype(np.int64)
