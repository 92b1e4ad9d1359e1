"""Binary moderation head, aware of the sub-classes of the positive class."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from waterdrop.model.head import Head, check_range, linear_map, pooled
from waterdrop.model.losses import sigmoid_focal
from waterdrop.registry import register_head

LOSSES = ("focal_softmax", "subclass_softmax", "softmax")


@register_head
class BinaryHead(Head):
    """Positive vs normal from the deepest feature level, with sub-classes of the positive.

    Logits are ``[normal, sub-class 1, ..., sub-class K]`` (``[normal, positive]`` for
    ``loss: softmax``). Losses:

    * ``focal_softmax``: focal loss over sigmoid sub-class logits + ``alpha`` x softmax
      cross-entropy over {normal, positive}, with the positive logit = logsumexp of the
      sub-class logits. P(positive) is that softmax; sub-class probabilities are sigmoids.
    * ``subclass_softmax``: one softmax over {normal, sub-classes}; P(positive) = 1 - P(normal).
    * ``softmax``: plain two-way softmax; sub-class labels are ignored.

    PCB (``pcb: {size, stride}``) average-pools the final feature map in ``size`` x ``size``
    windows at ``stride`` (a 4x4 map with size 2, stride 1 gives 3x3 parts), classifies each
    part, and takes per image the max over parts of the positive-side logits and the min of
    the normal logit: an image is normal only if every part is. With ``join_global`` the
    global-pooled logits are averaged in.

    Args:
        loss: one of ``focal_softmax``, ``subclass_softmax``, ``softmax``.
        alpha: weight of the {normal, positive} softmax term of ``focal_softmax``.
        gamma: focal exponent of ``focal_softmax`` (0 = binary cross-entropy).
        dropout: dropout before the classifier, in [0, 1).
        label_smoothing: label smoothing of the softmax cross-entropy, in [0, 0.5].
        pcb: null (global pooling) or ``{size: int, stride: int, join_global: bool}``.
    """

    kind = "binary"
    cam_meaning = ("evidence for positive over normal at each position: the sub-class logit maps weighted by "
                   "the softmax of the image's sub-class logits, minus the normal logit map (the decision "
                   "linearised; without PCB its spatial mean is the decision logit when there is one sub-class); "
                   "positive values point at what makes the image positive")

    def __init__(self, in_channels, labels, negative_label, *, loss: str = "focal_softmax", alpha: float = 2.0,
                 gamma: float = 2.0, dropout: float = 0.0, label_smoothing: float = 0.0, pcb: dict | None = None):
        super().__init__(in_channels, labels, negative_label)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss_type = loss
        self.alpha = check_range("alpha", alpha, 0.0, 100.0)
        self.gamma = check_range("gamma", gamma, 0.0, 10.0)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 0.5)
        self.dropout = nn.Dropout(check_range("dropout", dropout, 0.0, 0.99))
        self.reports_subclasses = loss != "softmax" and len(labels) > 1
        outputs = 2 if loss == "softmax" else len(labels) + 1
        self.part_size = self.part_stride = 0
        self.join_global = True
        if pcb is not None:
            self._read_pcb(pcb)
            self.part_fc = nn.Conv2d(in_channels[-1], outputs, 1)
        self.fc = nn.Linear(in_channels[-1], outputs) if self.join_global else None

    def _read_pcb(self, pcb: dict) -> None:
        if not isinstance(pcb, dict) or not set(pcb) <= {"size", "stride", "join_global"}:
            raise ValueError(f"pcb must be null or a mapping with keys size, stride, join_global; got {pcb!r}")
        self.part_size = int(check_range("pcb.size", pcb.get("size", 2), 1, 64))
        self.part_stride = int(check_range("pcb.stride", pcb.get("stride", 1), 1, 64))
        self.join_global = pcb.get("join_global", False)
        if not isinstance(self.join_global, bool):
            raise ValueError(f"pcb.join_global must be true or false, got {self.join_global!r}")

    def forward(self, feats):
        feature = self.dropout(feats[-1])
        if not self.part_size:
            return {"logits": self.fc(pooled(feature))}
        height, width = feature.shape[-2:]
        if height < self.part_size or width < self.part_size:
            raise ValueError(f"pcb.size {self.part_size} is larger than the final feature map ({height}x{width}); "
                             "lower pcb.size or raise model.input_size")
        parts = F.avg_pool2d(feature, self.part_size, self.part_stride)
        part_logits = self.part_fc(parts).flatten(2)
        logits = torch.cat([part_logits[:, :1].amin(dim=2), part_logits[:, 1:].amax(dim=2)], dim=1)
        if self.join_global:
            logits = (logits + self.fc(pooled(feature))) / 2
        return {"logits": logits}

    def class_maps(self, feature: torch.Tensor) -> torch.Tensor:
        """The logits at every position of the deepest feature map, (N, logits, h, w).

        Global pooling: their spatial mean is the logits. PCB: average pooling them in the
        parts' windows gives each part's logits (a 1x1 convolution commutes with average
        pooling), so the image's logits are the min (normal) and max (sub-classes) over those.
        """
        maps = self.part_fc(feature) if self.part_size else None
        if self.fc is not None:
            whole = linear_map(self.fc, feature)
            maps = whole if maps is None else (maps + whole) / 2
        return maps

    def cam(self, feats):
        # d(logsumexp)/d(logit_k) = softmax_k: the positive map is the sub-class maps weighted as
        # the image's logits weigh them, which is also Grad-CAM's weighting for a global head.
        maps = self.class_maps(feats[-1])
        weights = self.forward(feats)["logits"][:, 1:].softmax(dim=1)
        return (weights[:, :, None, None] * maps[:, 1:]).sum(dim=1) - maps[:, 0]

    def explain_targets(self):
        # loss: softmax over several sub-classes has only [normal, positive] logits
        subclasses = self.labels if self.loss_type != "softmax" or len(self.labels) == 1 else []
        return [None, *subclasses]

    def target_score(self, outputs, target):
        """None: the positive-vs-normal decision logit (P(positive) is its sigmoid); a sub-class
        name: that sub-class's logit."""
        logits = outputs["logits"]
        if target is None:
            binary = self._binary_logits(logits)
            return binary[:, 1] - binary[:, 0]
        return logits[:, 1 + self.labels.index(target)]

    def _binary_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[normal, positive] logits; positive is the logsumexp of the sub-class logits."""
        return torch.stack([logits[:, 0], logits[:, 1:].logsumexp(dim=1)], dim=1)

    def loss(self, outputs, target):
        logits = outputs["logits"]
        positive = (target > 0).long()
        smoothing = self.label_smoothing
        if self.loss_type == "softmax":
            return {"loss_cls": F.cross_entropy(logits, positive, label_smoothing=smoothing, reduction="none")}
        if self.loss_type == "subclass_softmax":
            return {"loss_cls": F.cross_entropy(logits, target, label_smoothing=smoothing, reduction="none")}
        subclass_truth = F.one_hot(target, logits.shape[1])[:, 1:].to(logits.dtype)
        focal = sigmoid_focal(logits[:, 1:], subclass_truth, self.gamma).sum(dim=1)
        binary = F.cross_entropy(self._binary_logits(logits), positive, label_smoothing=smoothing, reduction="none")
        return {"loss_focal": focal, "loss_binary": self.alpha * binary}

    def predict(self, outputs):
        logits = outputs["logits"]
        if self.loss_type == "softmax":
            return {"prob": logits.softmax(dim=1)[:, 1]}
        if self.loss_type == "subclass_softmax":
            probs = logits.softmax(dim=1)
            prob, subclass = 1 - probs[:, 0], probs[:, 1:]
        else:
            prob, subclass = self._binary_logits(logits).softmax(dim=1)[:, 1], torch.sigmoid(logits[:, 1:])
        return {"prob": prob, "subclass_prob": subclass} if self.reports_subclasses else {"prob": prob}

    def encode_target(self, names, missing):
        if missing:
            raise ValueError("a binary task cannot have missing labels")
        if len(names) > 1:
            raise ValueError(f"expected one label ('{self.negative_label}' or one of the labels) or [] for "
                             f"'{self.negative_label}', got {names}")
        self._check_known(names, [self.negative_label, *self.labels])
        name = names[0] if names else self.negative_label  # [] means a normal image
        return np.int64(0 if name == self.negative_label else 1 + self.labels.index(name))

    def score_and_truth(self, predictions, target):
        return predictions["prob"], (target > 0).astype(np.int64)
