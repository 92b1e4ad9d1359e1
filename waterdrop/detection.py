"""Detection post-processing and scoring in numpy (no torch): NMS, per-image detections and
mAP at an IoU threshold. Eval and the ONNX runtime share it, so they report the same boxes."""

from __future__ import annotations

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), xyxy."""
    sides = np.maximum(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0)
    inter = sides[..., 0] * sides[..., 1]
    size_a, size_b = np.maximum(a[:, 2:] - a[:, :2], 0), np.maximum(b[:, 2:] - b[:, :2], 0)
    area_a, area_b = size_a[:, 0] * size_a[:, 1], size_b[:, 0] * size_b[:, 1]
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


#: Candidates up to which NMS computes all their overlaps at once (faster); above, the memory
#: (N x N x 2) and the work on boxes already suppressed cost more than the loop saves.
ALL_OVERLAPS_UP_TO = 256


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    if len(order) > ALL_OVERLAPS_UP_TO:  # many candidates (evaluation's low threshold): a row at a time
        while len(order):
            best, order = order[0], order[1:]
            keep.append(best)
            if len(order):
                order = order[box_iou(boxes[best][None], boxes[order])[0] <= iou_threshold]
        return np.asarray(keep, dtype=np.int64)
    # Every overlap at once: one numpy call instead of one per kept box (a scan's hot path).
    overlaps = box_iou(boxes[order], boxes[order])
    remaining = np.ones(len(order), bool)
    for rank in range(len(order)):
        if remaining[rank]:
            keep.append(order[rank])
            remaining &= overlaps[rank] <= iou_threshold
    return np.asarray(keep, dtype=np.int64)


def detect(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, iou_threshold: float,
           max_detections: int = 50) -> list[tuple[int, float, np.ndarray]]:
    """Detections of one image from per-anchor boxes (A, 4) and class scores (A, K):
    per class, scores above the threshold, then NMS; ``(class, score, box)`` best first."""
    found = []
    for c in range(scores.shape[1]):
        candidates = np.nonzero(scores[:, c] >= score_threshold)[0]
        if not len(candidates):
            continue
        kept = candidates[nms(boxes[candidates], scores[candidates, c], iou_threshold)]
        found += [(c, float(scores[k, c]), boxes[k]) for k in kept]
    found.sort(key=lambda d: -d[1])
    return found[:max_detections]


def detection_ap(detections: list[list[tuple[int, float, np.ndarray]]], truths: list[list[tuple[int, np.ndarray]]],
                 num_classes: int, iou_threshold: float = 0.5) -> list[float]:
    """Average precision per class (all-point interpolated PR area, VOC 2010+ style): a
    detection is a true positive when it overlaps a not-yet-matched ground-truth box of its
    class with IoU >= ``iou_threshold``. NaN for a class without ground truth."""
    aps = []
    for c in range(num_classes):
        scored = [(score, i, box) for i, dets in enumerate(detections) for cls, score, box in dets if cls == c]
        scored.sort(key=lambda d: -d[0])
        gts = {i: np.array([box for cls, box in truth if cls == c]).reshape(-1, 4) for i, truth in enumerate(truths)}
        total = sum(len(g) for g in gts.values())
        if total == 0:
            aps.append(float("nan"))
            continue
        used = {i: np.zeros(len(g), bool) for i, g in gts.items()}
        hits = []
        for _, i, box in scored:
            gt = gts[i]
            if len(gt):
                overlaps = box_iou(box[None], gt)[0]
                overlaps[used[i]] = -1
                best = int(np.argmax(overlaps))
                if overlaps[best] >= iou_threshold:
                    used[i][best] = True
                    hits.append(1)
                    continue
            hits.append(0)
        hits = np.asarray(hits, dtype=float)
        tp = np.cumsum(hits)
        precision = tp / np.arange(1, len(hits) + 1) if len(hits) else np.zeros(0)
        recall = tp / total
        # precision envelope, then area under the step curve
        envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(hits) else precision
        aps.append(float(np.sum(np.diff(np.r_[0.0, recall]) * envelope)))
    return aps
