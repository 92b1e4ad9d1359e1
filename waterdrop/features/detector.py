"""Detector assist: an SSD head (``waterdrop.model.ssd``) beside a multi-label task's head,
trained on the manifest's ``boxes`` of its classes, whose best detection per class assists
the tags of small objects.

Settings (task YAML ``detector``, ``waterdrop.config.schema.DetectorConfig``): ``classes``
(labels of the task), feature ``levels``, ``anchor_scale``, ``fusion`` (``max``: the larger
of tag probability and detection score, ``mean``: their average, ``none``: the tag alone),
``max_boxes`` per image, ``loss_weight`` of its term ``<task>.loss_det`` (part of the task's
own loss per sample), and the runtime's
``score_threshold`` and ``nms_iou``. Boxes of other labels are ignored; the boxes of the
detector classes are taken as complete.

Deploy outputs: ``prob`` (the fused tags), ``tag_prob`` (the tags alone), ``det_boxes`` and
``det_scores`` (before NMS, which the runtime applies). Evaluation adds its mAP@0.5 and the
tags' AP with and without the assist.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from waterdrop.config import RegistryConfig, blamed_on
from waterdrop.config.schema import check_levels
from waterdrop.detection import detect, detection_ap
from waterdrop.evaluation.metrics import average_precision
from waterdrop.features.base import TaskFeature, register_feature
from waterdrop.model.ssd import SSDHead


class BoxEncoder:
    """A sample's boxes as the fixed-size array the loader batches: (max_boxes, 5) rows of
    [class, x1, y1, x2, y2] (0..1) for the detector classes; -1 pads; boxes beyond
    ``max_boxes`` are left out (counted by ``beyond_limit``)."""

    def __init__(self, classes: list[str], max_boxes: int):
        self.classes, self.max_boxes = list(classes), max_boxes

    def left_out(self, count: int) -> str:
        return (f"{count} boxes in the training data are beyond detector.max_boxes ({self.max_boxes}) per image "
                "and are not trained; raise max_boxes to use them")

    def beyond_limit(self, classes: list[str]) -> int:
        return max(0, sum(c in self.classes for c in classes) - self.max_boxes)

    def __call__(self, classes: list[str], boxes: np.ndarray) -> np.ndarray:
        rows = np.full((self.max_boxes, 5), -1.0, dtype=np.float32)
        kept = [(self.classes.index(c), box) for c, box in zip(classes, boxes) if c in self.classes][:self.max_boxes]
        for i, (c, box) in enumerate(kept):
            rows[i] = [c, *box]
        return rows


class AssistingDetector(nn.Module):
    """The SSD head of one task and the projection of its classes onto the task's tags."""

    def __init__(self, channels: list[int], levels: list[int], labels: list[str], classes: list[str],
                 anchor_scale: float):
        super().__init__()
        self.levels = levels
        self.ssd = SSDHead([channels[v] for v in levels], len(classes), anchor_scale)
        # (K, L) projection of per-class detection scores onto the tag columns
        projection = torch.zeros(len(classes), len(labels))
        projection[torch.arange(len(classes)), torch.tensor([labels.index(c) for c in classes])] = 1.0
        self.register_buffer("to_tags", projection, persistent=False)
        self.register_buffer("columns", projection.sum(0) > 0, persistent=False)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.ssd([feats[v] for v in self.levels])


@register_feature
class Detector(TaskFeature):
    key = "detector"

    def __init__(self, cfg: RegistryConfig, net):
        super().__init__(cfg, net)
        self.labels = {task.name: task.labels for task in cfg.tasks}
        for task in cfg.tasks:
            spec = self.settings.get(task.name)
            if spec is None:
                continue
            with blamed_on(task.file, "detector.levels"):
                levels = sorted(set(check_levels(spec.levels, len(net.channels))))
            self.per_task[task.name] = AssistingDetector(net.channels, levels, task.labels, spec.classes,
                                                         spec.anchor_scale)

    def renamed_state(self):
        # The SSD head was part of the multi-label head, whose own weights are not renamed.
        return {f"heads.{task}.ssd.": f"features.detector.per_task.{task}.ssd." for task in self.settings}

    def add_outputs(self, task, feats, images, outputs, complete, cams):
        if task in self.per_task:
            outputs.update(self.per_task[task](feats))

    def adjust_predictions(self, task, outputs, predictions):
        if task not in self.per_task:
            return
        detector, spec, prob = self.per_task[task], self.settings[task], predictions["prob"]
        scores = outputs["det_logits"].softmax(dim=-1)[..., 1:]
        best = scores.amax(dim=1) @ detector.to_tags
        fused = {"max": torch.maximum(prob, best), "mean": (prob + best) / 2, "none": prob}[spec.fusion]
        predictions.update(prob=torch.where(detector.columns, fused, prob), tag_prob=prob,
                           det_boxes=SSDHead.decode(outputs["det_deltas"], outputs["anchors"]), det_scores=scores)

    def metadata(self, task, output_shapes):
        if task not in self.per_task:
            return None
        spec = self.settings[task]
        return {"classes": spec.classes, "score_threshold": spec.score_threshold, "nms_iou": spec.nms_iou,
                "fusion": spec.fusion,
                "format": "det_boxes (N, anchors, 4): x1, y1, x2, y2 as fractions of the image; det_scores "
                          "(N, anchors, classes): per-class probabilities; before NMS (the runtime applies it)"}

    def data_needs(self, task, needs):
        if task in self.settings:
            needs.boxes = BoxEncoder(self.settings[task].classes, self.settings[task].max_boxes)

    def sample_terms(self, task, outputs, target, extras):
        """SSD's loss on the task's boxes, per image (a batch without ``boxes`` has none); a
        detector class whose tag is unknown (``missing``) for an image is ignored there."""
        if task not in self.settings:
            return {}
        spec = self.settings[task]
        unknown = target[:, [self.labels[task].index(c) for c in spec.classes]] < 0
        boxes = extras.get("boxes", target.new_full((len(target), 0, 5), -1.0))
        return {"loss_det": self.per_task[task].ssd.loss(outputs, boxes, unknown) * spec.loss_weight}

    def reports(self, task):
        return task in self.settings

    def report(self, task, predictions, truth, extras):
        """Detector mAP@0.5 per class, and the AP of the detector classes' tags with and without
        the detector's assist."""
        spec, labels = self.settings[task], self.labels[task]
        truths = [[(int(row[0]), row[1:]) for row in image if row[0] >= 0] for image in extras["boxes"]]
        # mAP is scored over all candidate boxes (a low threshold), as is usual for AP. Greedy NMS
        # never lets a lower score suppress a higher one, so the reported detections are these
        # candidates at or above the score threshold.
        ranked = [detect(b, s, 0.01, spec.nms_iou) for b, s in zip(predictions["det_boxes"], predictions["det_scores"])]
        found = [[d for d in image if d[1] >= spec.score_threshold] for image in ranked]
        aps = detection_ap(ranked, truths, len(spec.classes))
        tags = {}
        for c, label in enumerate(spec.classes):
            j = labels.index(label)
            known = truth[:, j] >= 0
            tags[label] = {"ap_with_detector": average_precision(predictions["prob"][known, j], truth[known, j]),
                           "ap_tag_only": average_precision(predictions["tag_prob"][known, j], truth[known, j]),
                           "detector_ap50": aps[c]}
        valid = [a for a in aps if not np.isnan(a)]
        return {"map50": float(np.mean(valid)) if valid else float("nan"), "fusion": spec.fusion,
                "detections_per_image": float(np.mean([len(f) for f in found])), "classes": tags}

    @classmethod
    def format_report(cls, entry):
        return [f"  detector mAP@0.5 {entry['map50']:.3f}; tag AP with / without the detector (fusion "
                f"{entry['fusion']}): " + "  ".join(f"{k} {v['ap_with_detector']:.2f} / {v['ap_tag_only']:.2f}"
                                                    for k, v in entry["classes"].items())]
