"""Task datasets from JSONL manifests or folder-per-class trees, and their multi-task union.

An image that cannot be decoded is skipped: the sample is taken from the next readable
image of the same task and the skipped path travels with the batch (``skipped``), so it
is counted and reported per epoch, never silently dropped.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from waterdrop.imageio import IMAGE_SUFFIXES, ImageDecodeError, read_image, resize


class DataError(ValueError):
    """A manifest or data folder is malformed; the message names the file and line."""


@dataclass
class Record:
    path: Path
    labels: list[str]
    missing: list[str] = field(default_factory=list)
    boxes: list = field(default_factory=list)


def _string_list(value, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{what}' must be a label name or a list of label names, got {value!r}")
    return value


def read_manifest(path: Path) -> list[Record]:
    """JSONL: one object a line with ``image`` (relative to the manifest), ``labels``,
    optional ``missing`` (labels not annotated for this image) and ``boxes``."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                    raise ValueError("expected an object with an 'image' path")
                if "labels" not in item:
                    raise ValueError("missing key 'labels'")
                records.append(Record(path=path.parent / item["image"],
                                      labels=_string_list(item["labels"], "labels"),
                                      missing=_string_list(item.get("missing", []), "missing"),
                                      boxes=item.get("boxes", [])))
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                raise DataError(f"{path}:{lineno}: {err}") from err
    return records


def read_folders(root: Path, known: list[str]) -> list[Record]:
    """Folder per class: ``root/<label>/**/*.jpg``."""
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in known:
            raise DataError(f"{folder}: folder name '{folder.name}' is not a label; known: {', '.join(known)}")
        records += [Record(path=p, labels=[folder.name]) for p in sorted(folder.rglob("*"))
                    if p.suffix.lower() in IMAGE_SUFFIXES]
    return records


def read_records(source: Path, known: list[str]) -> list[Record]:
    if source.is_dir():
        records = read_folders(source, known)
    elif source.is_file() and source.suffix == ".jsonl":
        records = read_manifest(source)
    else:
        raise DataError(f"{source}: expected a .jsonl manifest or a folder with one sub-folder per label")
    if not records:
        raise DataError(f"{source}: no images listed")
    return records


class TrainTransform:
    """RandomResizedCrop (area fraction in ``crop_scale``, aspect 3/4..4/3) and horizontal flip."""

    def __init__(self, size: int, crop_scale: tuple[float, float], hflip: bool):
        self.size, self.crop_scale, self.hflip = size, crop_scale, hflip

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        area = height * width * random.uniform(*self.crop_scale)
        aspect = np.exp(random.uniform(np.log(3 / 4), np.log(4 / 3)))
        crop_w = int(min(width, round(np.sqrt(area * aspect))))
        crop_h = int(min(height, round(np.sqrt(area / aspect))))
        top, left = random.randint(0, height - crop_h), random.randint(0, width - crop_w)
        image = resize(image[top:top + crop_h, left:left + crop_w], self.size)
        if self.hflip and random.random() < 0.5:
            image = cv2.flip(image, 1)
        return image


class EvalTransform:
    """Plain resize, the same the runtime does."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return resize(image, self.size)


class TaskDataset(Dataset):
    """Images and encoded targets of one task.

    Args:
        task_index: position of the task in the registry.
        records: parsed manifest or folder records.
        encode: the head's ``encode_target``.
        transform: image -> image at model size.
        source: the manifest or folder, for error messages.
    """

    def __init__(self, task_index: int, records: list[Record], encode: Callable, transform: Callable,
                 source: Path):
        self.task_index, self.records, self.transform = task_index, records, transform
        self.targets = []
        for i, record in enumerate(records):
            try:
                self.targets.append(encode(record.labels, record.missing))
            except ValueError as err:
                where = f"line {i + 1}" if source.suffix == ".jsonl" else str(record.path)
                raise DataError(f"{source}: {where}: {err}") from err

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for step in range(len(self.records)):
            record = self.records[(index + step) % len(self.records)]
            try:
                image = read_image(record.path)
            except ImageDecodeError:
                skipped.append(str(record.path))
                continue
            return {"image": np.ascontiguousarray(self.transform(image).transpose(2, 0, 1)),
                    "task": self.task_index, "target": self.targets[(index + step) % len(self.records)],
                    "skipped": skipped}
        raise RuntimeError(f"task {self.task_index}: none of its {len(self.records)} images can be decoded")


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
    """Stack a mixed batch; targets are grouped per task in batch order."""
    targets = {}
    for t, name in enumerate(task_names):
        rows = [s["target"] for s in samples if s["task"] == t]
        if rows:
            targets[name] = torch.from_numpy(np.stack(rows))
    return {
        "inputs": torch.from_numpy(np.stack([s["image"] for s in samples])),
        "task_index": torch.tensor([s["task"] for s in samples], dtype=torch.long),
        "targets": targets,
        "skipped": [[task_names[s["task"]], path] for s in samples for path in s["skipped"]],
    }
