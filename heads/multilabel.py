"""Multi-label tag head: one independent binary decision per label, with an optional SSD
detector whose detections assist the tags of small objects."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from waterdrop.model.head import Head, check_range, linear_map, pooled
from waterdrop.model.losses import sigmoid_focal
from waterdrop.model.ssd import SSDHead
from waterdrop.registry import register_head

FUSION_RULES = ("max", "mean", "none")
DETECTOR_KEYS = {"classes", "levels", "anchor_scale", "fusion", "max_boxes", "loss_weight", "score_threshold",
                 "nms_iou"}


@register_head
class MultiLabelHead(Head):
    """Per-label sigmoid outputs with binary cross-entropy or focal loss.

    A label listed under ``missing`` in a manifest line is unknown for that image: it is
    masked out of the loss instead of being taken as a negative.

    With ``detector``, an SSD head on the chosen feature levels is trained from the
    manifest's ``boxes`` of the detector classes (boxes of other labels are ignored; the
    boxes of detector classes are taken as complete). Its best detection score per class
    assists that class's tag: ``fusion: max`` takes the larger of tag probability and
    detection score, ``mean`` their average, ``none`` leaves the tag alone.

    Args:
        loss: ``bce`` or ``focal`` (sigmoid focal loss, which down-weights the many easy
            negatives of rare labels).
        gamma: focal exponent, used with ``loss: focal``.
        dropout: dropout before the classifier, in [0, 1).
        detector: null or ``{classes: [labels], levels: [feature levels], anchor_scale,
            fusion, max_boxes, loss_weight, score_threshold, nms_iou}``.
    """

    kind = "multilabel"
    cam_meaning = ("one map per label: the tag logit at each position (its spatial mean is the tag logit); "
                   "the detector is not part of it")

    def __init__(self, in_channels, labels, negative_label, *, loss: str = "bce", gamma: float = 2.0,
                 dropout: float = 0.0, detector: dict | None = None):
        super().__init__(in_channels, labels, negative_label)
        if loss not in ("bce", "focal"):
            raise ValueError(f"loss must be bce or focal, got {loss!r}")
        self.gamma = check_range("gamma", gamma, 0.0, 10.0) if loss == "focal" else 0.0
        self.dropout = nn.Dropout(check_range("dropout", dropout, 0.0, 0.99))
        self.fc = nn.Linear(in_channels[-1], len(labels))
        self.detector, self.ssd = None, None
        if detector is not None:
            self._build_detector(detector)

    @property
    def uses_boxes(self) -> bool:
        return self.ssd is not None

    def _build_detector(self, spec: dict) -> None:
        if not isinstance(spec, dict) or not set(spec) <= DETECTOR_KEYS or "classes" not in spec:
            raise ValueError(f"detector must be null or a mapping with 'classes' and optionally "
                             f"{', '.join(sorted(DETECTOR_KEYS - {'classes'}))}; got {spec!r}")
        classes = spec["classes"]
        if not isinstance(classes, list) or not classes or any(c not in self.labels for c in classes):
            raise ValueError(f"detector.classes must be a non-empty list of this task's labels, got {classes!r}")
        levels = spec.get("levels", [-3, -2])
        count = len(self.in_channels)
        if (not isinstance(levels, list) or not levels
                or not all(isinstance(v, int) and -count <= v < count for v in levels)):
            raise ValueError(f"detector.levels must list feature levels in 0..{count - 1} (or negative), "
                             f"got {levels!r}")
        fusion = spec.get("fusion", "max")
        if fusion not in FUSION_RULES:
            raise ValueError(f"detector.fusion must be one of {', '.join(FUSION_RULES)}, got {fusion!r}")
        self.detector = {
            "classes": list(classes), "levels": sorted({v % count for v in levels}), "fusion": fusion,
            "max_boxes": int(check_range("detector.max_boxes", spec.get("max_boxes", 10), 1, 1000)),
            "loss_weight": check_range("detector.loss_weight", spec.get("loss_weight", 1.0), 0.0, 100.0),
            "score_threshold": check_range("detector.score_threshold", spec.get("score_threshold", 0.3), 0.0, 1.0),
            "nms_iou": check_range("detector.nms_iou", spec.get("nms_iou", 0.45), 0.0, 1.0),
        }
        self.ssd = SSDHead([self.in_channels[v] for v in self.detector["levels"]], len(classes),
                           check_range("detector.anchor_scale", spec.get("anchor_scale", 2.0), 0.1, 32.0))
        columns = [self.labels.index(c) for c in classes]
        # (K, L) projection of per-class detection scores onto the tag columns
        projection = torch.zeros(len(classes), len(self.labels))
        projection[torch.arange(len(classes)), torch.tensor(columns)] = 1.0
        self.register_buffer("det_to_tags", projection, persistent=False)
        self.register_buffer("det_columns", projection.sum(0) > 0, persistent=False)

    def forward(self, feats):
        outputs = {"logits": self.fc(self.dropout(pooled(feats[-1])))}
        if self.ssd is not None:
            outputs.update(self.ssd([feats[v] for v in self.detector["levels"]]))
        return outputs

    def cam(self, feats):
        return linear_map(self.fc, feats[-1])

    def explain_targets(self):
        return list(self.labels)

    def target_score(self, outputs, target):
        """The tag logit of label ``target`` (before any fusion with the detector)."""
        return outputs["logits"][:, self.labels.index(target)]

    def _split(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tag targets (N, L) and, with a detector, boxes (N, max_boxes, 5)."""
        tags = target[:, :len(self.labels)]
        if self.ssd is None:
            return tags, None
        return tags, target[:, len(self.labels):].reshape(len(target), -1, 5)

    def loss(self, outputs, target):
        tags, boxes = self._split(target)
        known = (tags >= 0).float()
        per_label = sigmoid_focal(outputs["logits"], tags.clamp(min=0), self.gamma)
        terms = {"loss_cls": (per_label * known).sum(dim=1) / known.sum(dim=1).clamp(min=1)}
        if boxes is not None:
            unknown = tags[:, [self.labels.index(c) for c in self.detector["classes"]]] < 0
            terms["loss_det"] = self.ssd.loss(outputs, boxes, unknown) * self.detector["loss_weight"]
        return terms

    def predict(self, outputs):
        prob = torch.sigmoid(outputs["logits"])
        if self.ssd is None:
            return {"prob": prob}
        scores = outputs["det_logits"].softmax(dim=-1)[..., 1:]
        boxes = SSDHead.decode(outputs["det_deltas"], outputs["anchors"])
        best = scores.amax(dim=1) @ self.det_to_tags
        fused = {"max": torch.maximum(prob, best), "mean": (prob + best) / 2, "none": prob}[self.detector["fusion"]]
        return {"prob": torch.where(self.det_columns, fused, prob), "tag_prob": prob, "det_boxes": boxes,
                "det_scores": scores}

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

    def boxes_beyond_limit(self, classes: list[str]) -> int:
        """How many of an image's detector boxes ``encode_boxes`` leaves out (over max_boxes)."""
        return max(0, sum(c in self.detector["classes"] for c in classes) - self.detector["max_boxes"])

    def encode_boxes(self, classes: list[str], boxes: np.ndarray) -> np.ndarray:
        """Flat (max_boxes x 5) array of [class, x1, y1, x2, y2] (0..1) for detector classes; -1 pads;
        boxes beyond max_boxes are left out (see ``boxes_beyond_limit``)."""
        rows = np.full((self.detector["max_boxes"], 5), -1.0, dtype=np.float32)
        kept = [(self.detector["classes"].index(c), box) for c, box in zip(classes, boxes)
                if c in self.detector["classes"]][:self.detector["max_boxes"]]
        for i, (c, box) in enumerate(kept):
            rows[i] = [c, *box]
        return rows.reshape(-1)

    def score_and_truth(self, predictions, target):
        return predictions["prob"], target[:, :len(self.labels)].astype(np.int64)
