"""SSD-style detection head for small objects (Liu et al., 2016), on trunk feature levels.

Default boxes: at every location of every chosen level, four boxes centred on the cell:
squares of side ``anchor_scale`` cells and ``sqrt(2)`` times that, and 2:1 and 1:2
rectangles of the same area as the first. Coordinates are fractions of the input image.
Box regression uses SSD's centre/size encoding with variances 0.1 and 0.2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VARIANCES = (0.1, 0.2)
ANCHORS_PER_CELL = 4


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    centre, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix of xyxy boxes (N, 4) x (M, 4)."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


class SSDHead(nn.Module):
    """Class logits (background + ``num_classes``) and box offsets for every default box.

    Args:
        in_channels: channels of the chosen feature levels.
        num_classes: detector classes (background excluded).
        anchor_scale: side of the base default box, in cells of its level.
        iou_threshold: a default box matching a ground-truth box at this IoU is positive
            (each ground-truth box also takes its best default box).
        negatives_per_positive: hard-negative mining ratio.
    """

    def __init__(self, in_channels: list[int], num_classes: int, anchor_scale: float = 2.0,
                 iou_threshold: float = 0.5, negatives_per_positive: int = 3):
        super().__init__()
        self.num_classes, self.anchor_scale = num_classes, anchor_scale
        self.iou_threshold, self.negatives_per_positive = iou_threshold, negatives_per_positive
        self.cls_convs = nn.ModuleList(
            nn.Conv2d(c, ANCHORS_PER_CELL * (num_classes + 1), 3, padding=1) for c in in_channels)
        self.box_convs = nn.ModuleList(nn.Conv2d(c, ANCHORS_PER_CELL * 4, 3, padding=1) for c in in_channels)

    def anchors(self, sizes: list[tuple[int, int]], device) -> torch.Tensor:
        """Default boxes (A, 4) as cx, cy, w, h, in the order of the flattened predictions."""
        all_anchors = []
        root2 = math.sqrt(2.0)
        for height, width in sizes:
            ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
            xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            side_w, side_h = self.anchor_scale / width, self.anchor_scale / height
            shapes = torch.tensor([[side_w, side_h], [side_w * root2, side_h * root2],
                                   [side_w * root2, side_h / root2], [side_w / root2, side_h * root2]], device=device)
            centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, ANCHORS_PER_CELL, 2)
            all_anchors.append(torch.cat([centres, shapes.expand(height * width, -1, -1)], dim=-1).reshape(-1, 4))
        return torch.cat(all_anchors)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = feats[0].shape[0]
        logits = [conv(f).permute(0, 2, 3, 1).reshape(batch, -1, self.num_classes + 1)
                  for conv, f in zip(self.cls_convs, feats)]
        deltas = [conv(f).permute(0, 2, 3, 1).reshape(batch, -1, 4) for conv, f in zip(self.box_convs, feats)]
        anchors = self.anchors([tuple(f.shape[-2:]) for f in feats], feats[0].device)
        return {"det_logits": torch.cat(logits, 1), "det_deltas": torch.cat(deltas, 1), "anchors": anchors}

    @staticmethod
    def decode(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Boxes (N, A, 4) xyxy in 0..1 from offsets and default boxes."""
        centre = anchors[:, :2] + deltas[..., :2] * VARIANCES[0] * anchors[:, 2:]
        size = anchors[:, 2:] * torch.exp(deltas[..., 2:] * VARIANCES[1])
        return cxcywh_to_xyxy(torch.cat([centre, size], dim=-1)).clamp(0, 1)

    def _encode(self, gt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        centre = (gt[:, :2] + gt[:, 2:]) / 2
        size = (gt[:, 2:] - gt[:, :2]).clamp(min=1e-6)
        return torch.cat([(centre - anchors[:, :2]) / (VARIANCES[0] * anchors[:, 2:]),
                          torch.log(size / anchors[:, 2:]) / VARIANCES[1]], dim=1)

    def loss(self, outputs: dict[str, torch.Tensor], boxes: torch.Tensor,
             unknown: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image loss (N,): cross-entropy over positives and the hardest negatives
        (``negatives_per_positive`` per positive, at least that many per image, so images
        without objects still teach the background) plus smooth-L1 on positive offsets.
        Scaled so that its mean is the batch sum over the batch's positive count, or over
        its image count when objects are rarer than one per image (SSD divides by the
        positives alone, which lets the background terms of object-free images explode).

        Args:
            boxes: (N, M, 5) rows of [class, x1, y1, x2, y2] in 0..1; class -1 pads.
            unknown: (N, C) True where a class was not annotated for that image (its tag is
                ``missing``): its objects may be there unboxed, so background anchors are not
                pushed away from that class (its logit is left out of their cross-entropy).
        """
        logits, deltas, anchors = outputs["det_logits"], outputs["det_deltas"], outputs["anchors"]
        anchors_xyxy = cxcywh_to_xyxy(anchors)
        per_image, positives = [], 0
        for b in range(len(logits)):
            gt = boxes[b][boxes[b, :, 0] >= 0]
            labels = torch.zeros(len(anchors), dtype=torch.long, device=logits.device)
            box_loss = logits.new_zeros(())
            if len(gt):
                iou = box_iou(anchors_xyxy, gt[:, 1:])
                best_iou, best_gt = iou.max(dim=1)
                best_anchor = iou.argmax(dim=0)
                best_iou[best_anchor] = 2.0  # every object keeps its best default box
                best_gt[best_anchor] = torch.arange(len(gt), device=gt.device)
                positive = best_iou >= self.iou_threshold
                labels[positive] = gt[best_gt[positive], 0].long() + 1
                target = self._encode(gt[best_gt[positive], 1:], anchors[positive])
                box_loss = F.smooth_l1_loss(deltas[b][positive], target, reduction="sum")
            positive = labels > 0
            count = int(positive.sum())
            positives += count
            ce = F.cross_entropy(logits[b], labels, reduction="none")
            if unknown is not None and unknown[b].any():
                masked = logits[b].masked_fill(F.pad(unknown[b], (1, 0)), float("-inf"))
                ce = torch.where(positive, ce, F.cross_entropy(masked, labels, reduction="none"))
            negatives = max(self.negatives_per_positive * count, self.negatives_per_positive)
            negative_ce = ce.masked_fill(positive, -1.0)
            hard = negative_ce.topk(min(negatives, int((~positive).sum()))).indices
            per_image.append(ce[positive].sum() + ce[hard].sum() + box_loss)
        return torch.stack(per_image) * len(per_image) / max(positives, len(per_image))
