"""Task datasets over the records of a split (``waterdrop.records``), and their multi-task union.

An image that cannot be decoded is skipped: the sample is taken from the next readable
image of the same task and the skipped path travels with the batch (``skipped``), so it
is counted and reported per epoch, never silently dropped.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from waterdrop.config import AugmentConfig
from waterdrop.imageio import ImageDecodeError, read_image, resize
from waterdrop.records import DataError, Record


def parse_boxes(boxes) -> tuple[list[str], np.ndarray]:
    """A manifest line's ``boxes``: [{"label": name, "box": [x1, y1, x2, y2]}] in pixels."""
    if not isinstance(boxes, list):
        raise ValueError(f"'boxes' must be a list, got {boxes!r}")
    classes, coordinates = [], []
    for entry in boxes:
        box = entry.get("box") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or not isinstance(entry.get("label"), str) or not isinstance(box, list)
                or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box)
                or box[2] <= box[0] or box[3] <= box[1]):
            raise ValueError(f"bad box {entry!r}; expected {{\"label\": name, \"box\": [x1, y1, x2, y2]}} with "
                             "x2 > x1 and y2 > y1, in pixels")
        classes.append(entry["label"])
        coordinates.append(box)
    return classes, np.asarray(coordinates, dtype=np.float64).reshape(-1, 4)


class TrainTransform:
    """The training augmentations of a task, in this order:

    RandomResizedCrop (area fraction in ``crop_scale``, aspect 3/4..4/3; [1, 1]: none, the whole
    image resized as in evaluation), horizontal flip,
    rotation by up to +-``rotation`` degrees, colour distortion of strength ``color``
    (brightness, contrast and saturation factors in 1 +- color, hue shifted by up to
    color x 18 degrees), and random erasing with probability ``erasing`` (a rectangle of
    2-33 % of the area, aspect 0.3-3.3, filled with noise; Zhong et al., 2020).

    Given pixel ``boxes`` (B, 4) xyxy, it returns ``(image, boxes, kept)``: the boxes follow
    crop, flip and rotation (a rotated box becomes the box around its corners), and a box
    with less than half its area inside the crop is dropped (``kept`` indexes the rest).
    """

    def __init__(self, size: int, augment: AugmentConfig):
        self.size, self.augment = size, augment
        # crop_scale [1, 1] is no crop at all: the whole image, as evaluation sees it (a full-area crop
        # at a random aspect would still cut up to a third of one side off, and a frame with it).
        self.crops = tuple(augment.crop_scale) != (1.0, 1.0)
        # The smallest crop (area crop_scale[0], aspect 4/3) still spans ``size`` pixels on its short
        # side from a decode whose short side is this long: a reduced JPEG decode loses nothing.
        self.min_side = math.ceil(size * math.sqrt(4 / 3 / augment.crop_scale[0])) if self.crops else size

    def __call__(self, image: np.ndarray, boxes: np.ndarray | None = None):
        aug = self.augment
        height, width = image.shape[:2]
        if self.crops:
            area = height * width * random.uniform(*aug.crop_scale)
            aspect = np.exp(random.uniform(np.log(3 / 4), np.log(4 / 3)))
            crop_w = int(min(width, max(1, round(np.sqrt(area * aspect)))))
            crop_h = int(min(height, max(1, round(np.sqrt(area / aspect)))))
            top, left = random.randint(0, height - crop_h), random.randint(0, width - crop_w)
        else:
            crop_w, crop_h, top, left = width, height, 0, 0
        image = resize(image[top:top + crop_h, left:left + crop_w], self.size)
        kept = None
        if boxes is not None:
            boxes, kept = crop_boxes(boxes, left, top, crop_w, crop_h)
            boxes = boxes * ([self.size / crop_w, self.size / crop_h] * 2)
        if aug.hflip and random.random() < 0.5:
            image = cv2.flip(image, 1)
            if boxes is not None:
                boxes = np.stack([self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], 1)
        if aug.rotation:
            matrix = rotation_matrix(self.size, self.size, random.uniform(-aug.rotation, aug.rotation))
            image = cv2.warpAffine(image, matrix, (self.size, self.size), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT_101)
            if boxes is not None:
                boxes = rotate_boxes(boxes, matrix, self.size)
        if aug.color:
            image = distort_color(image, aug.color)
        if aug.erasing and random.random() < aug.erasing:
            image = erase_random_rectangle(image)
        return image if boxes is None else (image, boxes, kept)


def crop_boxes(boxes: np.ndarray, left: int, top: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes in crop coordinates, clipped; those with under half their area inside are dropped."""
    shifted = boxes - [left, top, left, top]
    clipped = np.clip(shifted, 0, [width, height, width, height])
    area = np.prod(np.clip(shifted[:, 2:] - shifted[:, :2], 0, None), axis=1)
    inside = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
    kept = np.nonzero(inside >= 0.5 * np.maximum(area, 1e-9))[0]
    return clipped[kept], kept


def rotation_matrix(width: int, height: int, degrees: float) -> np.ndarray:
    return cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)


def rotate_boxes(boxes: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    corners = np.stack([boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [0, 3]], boxes[:, [2, 3]]], 1)
    moved = corners @ matrix[:, :2].T + matrix[:, 2]
    return np.clip(np.concatenate([moved.min(1), moved.max(1)], 1), 0, size)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the centre, keeping the size; borders are mirrored so no black corners appear."""
    height, width = image.shape[:2]
    matrix = rotation_matrix(width, height, degrees)
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def distort_color(image: np.ndarray, strength: float) -> np.ndarray:
    """Random brightness, contrast, saturation and hue of an RGB uint8 image."""
    def factor() -> float:
        return random.uniform(1 - strength, 1 + strength)

    out = image.astype(np.float32) * factor()
    out = (out - out.mean()) * factor() + out.mean()
    gray = out.mean(axis=2, keepdims=True)
    out = np.clip((out - gray) * factor() + gray, 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
    shift = int(round(random.uniform(-strength, strength) * 9))  # OpenCV hue runs 0..179 (2 degrees a step)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def erase_random_rectangle(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    for _ in range(10):
        area = height * width * random.uniform(0.02, 0.33)
        aspect = np.exp(random.uniform(np.log(0.3), np.log(1 / 0.3)))
        h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < h < height and 0 < w < width:
            top, left = random.randint(0, height - h), random.randint(0, width - w)
            image = image.copy()
            # Seeded from `random`, which DataLoader workers seed each; numpy's global state they share.
            noise = np.random.default_rng(random.getrandbits(32)).integers(0, 256, (h, w, image.shape[2]))
            image[top:top + h, left:left + w] = noise.astype(np.uint8)
            return image
    return image


class EvalTransform:
    """Plain resize, the same the runtime does (boxes are scaled along)."""

    def __init__(self, size: int):
        self.size = self.min_side = size

    def __call__(self, image: np.ndarray, boxes: np.ndarray | None = None):
        if boxes is None:
            return resize(image, self.size)
        height, width = image.shape[:2]
        scaled = boxes * ([self.size / width, self.size / height] * 2)
        return resize(image, self.size), scaled, np.arange(len(boxes))


class TaskDataset(Dataset):
    """Images and encoded targets of one task.

    Args:
        task_index: position of the task in the registry.
        records: parsed manifest or folder records.
        encode: the head's ``encode_target``.
        transform: image -> image at model size (at the teacher's, with ``student_size``).
        source: the manifest or folder, for error messages.
        unlabeled: records without labels, appended after the labeled ones (mean teacher).
        second_view: also return a second, independently augmented view (mean teacher).
        encode_boxes: when a feature reads boxes (``DataNeeds.boxes``): it encodes the boxes of
            each (augmented) sample, which comes back as ``boxes``.
        substitute: an undecodable image is replaced by the next readable one (training:
            the batch keeps its size). False (evaluation): the sample is dropped instead, so
            no image is scored twice; it comes back with ``image`` None and ``collate``
            leaves it out. Either way its path is reported in ``skipped``.
        student_size: set when a feature asks for a larger view (``DataNeeds.view_size``, a
            distillation teacher's input size); ``transform`` then works at that size, ``image``
            is its view shrunk to ``student_size`` and ``large_image`` the view itself: both
            networks see the same crop, each at its own resolution (upsampling the student's
            view would hide the detail a high-resolution teacher knows).
    """

    def __init__(self, task_index: int, records: list[Record], encode: Callable, transform: Callable,
                 source: Path, unlabeled: list[Record] = (), second_view: bool = False,
                 encode_boxes: Callable | None = None, substitute: bool = True, student_size: int | None = None):
        self.task_index, self.transform, self.second_view = task_index, transform, second_view
        self.student_size = student_size
        self.substitute = substitute
        self.encode_boxes = encode_boxes
        self.boxes_left_out = 0  # boxes beyond the encoder's limit; set by whoever knows it
        self.targets, self.boxes = [], []
        for record in records:
            try:
                self.targets.append(encode(record.labels, record.missing))
                if encode_boxes is not None:
                    self.boxes.append(parse_boxes(record.boxes))
            except ValueError as err:
                where = f"line {record.line}" if record.line else str(record.path)
                raise DataError(f"{source}: {where}: {err}") from err
        self.labeled_count = len(records)
        # Unlabeled samples carry a placeholder target; they are masked out of supervised losses.
        self.targets += [np.zeros_like(self.targets[0])] * len(unlabeled)
        self.boxes += [([], np.zeros((0, 4)))] * len(unlabeled) if encode_boxes is not None else []
        self.records = list(records) + list(unlabeled)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for step in range(len(self.records)):
            position = (index + step) % len(self.records)
            record = self.records[position]
            try:
                # Boxes are in the file's pixels: a task with boxes decodes whole.
                needed = None if self.encode_boxes else getattr(self.transform, "min_side", None)
                image = read_image(record.path, needed)
            except ImageDecodeError:
                skipped.append(str(record.path))
                if not self.substitute:
                    return {"image": None, "task": self.task_index, "skipped": skipped}
                continue
            encoded = None
            if self.encode_boxes is not None:
                classes, pixel_boxes = self.boxes[position]
                view, boxes, kept = self.transform(image, pixel_boxes)
                encoded = self.encode_boxes([classes[k] for k in kept], boxes / view.shape[0])
            else:
                view = self.transform(image)
            sample = {"image": _channels_first(self._student(view)), "task": self.task_index,
                      "target": self.targets[position], "index": position, "labeled": position < self.labeled_count,
                      "skipped": skipped}
            if encoded is not None:
                sample["boxes"] = encoded
            if self.student_size is not None:
                sample["large_image"] = _channels_first(view)
            if self.second_view:
                sample["image2"] = _channels_first(self._student(self.transform(image)))
            return sample
        raise RuntimeError(f"task {self.task_index}: none of its {len(self.records)} images can be decoded")

    def _student(self, view: np.ndarray) -> np.ndarray:
        if self.student_size is None:
            return view
        return cv2.resize(view, (self.student_size, self.student_size), interpolation=cv2.INTER_AREA)


def _channels_first(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(2, 0, 1))


class MultiTaskDataset(Dataset):
    """The union of all task datasets; global index = task offset + local index."""

    def __init__(self, datasets: list[TaskDataset]):
        self.datasets = datasets
        self.offsets = np.cumsum([0] + [len(d) for d in datasets]).tolist()

    @property
    def metainfo(self) -> dict:
        return {"task_sizes": self.sizes}

    @property
    def sizes(self) -> list[int]:
        return [len(d) for d in self.datasets]

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        task = bisect.bisect_right(self.offsets, index) - 1
        return self.datasets[task][index - self.offsets[task]]


def collate(samples: list[dict], task_names: list[str]) -> dict:
    """Stack a mixed batch; targets, labeled masks and sample ids (``ids``: the position of
    each sample in its task's dataset, which is the image actually used when a substitute
    stood in) are grouped per task in batch order.

    ``inputs2`` (second views) is present when some sample has one; samples without a
    second view repeat their first. ``large_inputs`` (the larger views, see ``TaskDataset``)
    is present when some sample has one; the rows of samples without one are zeros, never
    read. ``boxes`` (encoded boxes) are grouped per task like targets, for the tasks whose
    samples carry them. Dropped samples (``image`` None)
    only report their skipped paths; a batch of nothing but those has zero inputs.
    """
    skipped = [[task_names[s["task"]], path] for s in samples for path in s["skipped"]]
    samples = [s for s in samples if s["image"] is not None]
    if not samples:
        return {"inputs": torch.zeros((0, 3, 1, 1), dtype=torch.uint8), "task_index": torch.zeros(0, dtype=torch.long),
                "targets": {}, "labeled": {}, "ids": {}, "skipped": skipped}
    targets, labeled, ids, boxes = {}, {}, {}, {}
    for t, name in enumerate(task_names):
        rows = [s for s in samples if s["task"] == t]
        if rows:
            targets[name] = torch.from_numpy(np.stack([s["target"] for s in rows]))
            labeled[name] = torch.tensor([s.get("labeled", True) for s in rows])
            ids[name] = torch.tensor([s["index"] for s in rows], dtype=torch.long)
            if "boxes" in rows[0]:
                boxes[name] = torch.from_numpy(np.stack([s["boxes"] for s in rows]))
    batch = {
        "inputs": torch.from_numpy(np.stack([s["image"] for s in samples])),
        "task_index": torch.tensor([s["task"] for s in samples], dtype=torch.long),
        "targets": targets,
        "labeled": labeled,
        "ids": ids,
        "skipped": skipped,
    }
    if any("image2" in s for s in samples):
        batch["inputs2"] = torch.from_numpy(np.stack([s.get("image2", s["image"]) for s in samples]))
    views = [s["large_image"] for s in samples if "large_image" in s]
    if views:
        blank = np.zeros_like(views[0])
        batch["large_inputs"] = torch.from_numpy(np.stack([s.get("large_image", blank) for s in samples]))
    if boxes:
        batch["boxes"] = boxes
    return batch


def task_entries(batch: dict, task: str) -> dict:
    """The entries of a ``collate`` batch that are grouped per task (``targets``, ``labeled``,
    ``ids``, and what features asked for, e.g. ``boxes``), for one task's samples."""
    return {key: value[task] for key, value in batch.items() if isinstance(value, dict) and task in value}
