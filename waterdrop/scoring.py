"""Scoring exported models on a task's labeled split, torch-free: what the int8 gate and the
release comparison measure both files with (the same images decoded once for every model,
undecodable ones left out of all)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waterdrop.config import RegistryConfig, TaskConfig, config_from_dict, load_registry
from waterdrop.imageio import ImageDecodeError, list_images, read_image, to_model_input
from waterdrop.kinds import kind_of
from waterdrop.progress import Progress
from waterdrop.records import is_manifest, read_records, read_unlabeled
from waterdrop.runtime import Predictor


@dataclass
class TaskData:
    """Where one task is measured. ``gate``: the data the metric is compared on (the test split,
    else val); ``val``: where thresholds are chosen again (None keeps the fp32 file's);
    ``config``: the task's config, whose deploy target the kind's threshold rule reads."""

    name: str
    gate: Path
    gate_split: str
    val: Path | None = None
    config: TaskConfig | None = None


def load_config(path: str | Path) -> RegistryConfig:
    """A run folder, its ``config/resolved.json`` or a registry YAML (all torch-free)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config" / "resolved.json"
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"{path}: not found; give a run folder, its config/resolved.json or a registry YAML")
        return config_from_dict(json.loads(path.read_text()))
    return load_registry(path)


def task_data_from_config(cfg: RegistryConfig, entries: list[dict]) -> dict[str, TaskData]:
    """Each model task's test split (else val) and val split from ``cfg``, whose tasks must have
    the model's labels in the same order."""
    tasks = {task.name: task for task in cfg.tasks}
    data = {}
    for entry in entries:
        task = tasks.get(entry["name"])
        if task is None:
            raise ValueError(f"task {entry['name']} of the model is not in {cfg.file}")
        if task.labels != entry["labels"] or task.negative_label != entry["negative_label"]:
            raise ValueError(f"task {task.name}: the model's labels {entry['labels']} (negative "
                             f"'{entry['negative_label']}') differ from {cfg.file}'s {task.labels} (negative "
                             f"'{task.negative_label}')")
        split = "test" if task.test is not None else "val"
        data[task.name] = TaskData(task.name, task.test or task.val, split, task.val, task)
    return data


def read_labeled(source: Path, entry: dict) -> tuple[list[Path], np.ndarray]:
    """Image paths and one truth row per image, as the task's head scores them: per decision
    (binary: 1/0; multi-label: 1/0/-1 per tag) or, for a kind without decisions (graded), the
    index of the image's one label (as ``GradedHead.encode_target``)."""
    kind, rows = kind_of(entry["kind"]), []
    records = read_records(source, [entry["negative_label"], *entry["labels"]])
    for record in records:
        names, missing = record.labels, record.missing
        try:
            if kind.decisions(entry):
                rows.append(kind.decision_truth(entry, names, missing))
            elif len(names) == 1 and not missing and names[0] in entry["labels"]:
                rows.append(np.array([entry["labels"].index(names[0])]))
            else:
                raise ValueError(f"expected one of {', '.join(entry['labels'])}, got {names}")
        except ValueError as err:
            raise ValueError(f"{source}: {record.path.name}: {err}") from err
    return [record.path for record in records], np.stack(rows)


def score_outputs(predictors: dict[str, Predictor], entry: dict, source: Path, keys: list[str],
                  batch_size: int = 16) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray, list[str], list[Path]]:
    """Each model's outputs ``keys`` (of the task's metadata ``outputs``, named alike in every
    model, as the ONNX contract names them) over a split, the images
    decoded once for all of them; the truth, the undecodable images (left out for every model,
    as evaluation does) and the paths scored, in order."""
    paths, truth = read_labeled(source, entry)
    # Each model sees what serving gives it: a decode at its own input size (a JPEG at the
    # DCT scale that keeps it), so models of two sizes get a decode each.
    sizes = sorted({predictor.size for predictor in predictors.values()})
    kept, bad = [], []
    outputs = {name: {key: [] for key in keys} for name in predictors}
    meter = Progress(f"{entry['name']}: scoring {source.name} with {' and '.join(predictors)}", total=len(paths))
    for start in range(0, len(paths), batch_size):
        images: dict[int, list[np.ndarray]] = {size: [] for size in sizes}
        for index in range(start, min(start + batch_size, len(paths))):
            try:
                decoded = {size: read_image(paths[index], size) for size in sizes}
            except ImageDecodeError as err:
                bad.append(str(err))
                continue
            kept.append(index)
            for size, image in decoded.items():
                images[size].append(image)
        if images[sizes[0]]:
            batches = {size: to_model_input(images[size], size) for size in sizes}
            for name, predictor in predictors.items():
                got = predictor.outputs(batches[predictor.size], [entry["outputs"][key] for key in keys])
                for key in keys:
                    outputs[name][key].append(got[entry["outputs"][key]])
        tried = min(batch_size, len(paths) - start)
        meter.update(tried, failed=tried - len(images[sizes[0]]))
    meter.close()
    if not kept:
        raise ValueError(f"task {entry['name']}: none of the {len(paths)} images of {source} could be decoded")
    outputs = {name: {key: np.concatenate(chunks) for key, chunks in per_key.items()}
               for name, per_key in outputs.items()}
    truth = squeeze_truth(entry, outputs[next(iter(outputs))][keys[0]], truth[kept])
    return outputs, truth, bad, [paths[index] for index in kept]


def squeeze_truth(entry: dict, scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``truth`` as ``scores`` pair with it: binary and graded scores take one value per image."""
    if scores.ndim == 1 or not kind_of(entry["kind"]).decisions(entry):
        return truth[:, 0]
    return truth


@dataclass
class LabeledImages:
    """One task's split decoded once at a model's input size, to be scored by many files."""

    source: Path
    images: np.ndarray  # uint8 NCHW, exact: the runtime's float32 input holds the same integers
    truth: np.ndarray  # as ``read_labeled`` gives it, undecodable images left out
    undecodable: list[str]

    def scores(self, predictor: Predictor, entry: dict, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """The task's ``prob`` output of ``predictor`` on these images, and the truth that pairs with it."""
        name = entry["outputs"]["prob"]
        scores = np.concatenate([predictor.outputs(self.images[start:start + batch_size].astype(np.float32),
                                                   [name])[name] for start in range(0, len(self.images), batch_size)])
        return scores, squeeze_truth(entry, scores, self.truth)


def _model_inputs(paths: list[Path], size: int, meter: Progress, bad: list[str]) -> Iterator[tuple[int, np.ndarray]]:
    """(position, image) of each decodable path, decoded when asked for and preprocessed as
    the runtime does (uint8 CHW, exact: the runtime's float32 holds the same integers); the
    undecodable ones go to ``bad`` with the reason."""
    for index, path in enumerate(paths):
        try:
            image = to_model_input([read_image(path, size)], size)[0].astype(np.uint8)
        except ImageDecodeError as err:
            bad.append(str(err))
            meter.update(0, failed=1)
            continue
        meter.update(1)
        yield index, image


def decode_labeled(source: Path, entry: dict, size: int) -> LabeledImages:
    """A task's labeled split decoded as serving decodes it, at ``size``."""
    paths, truth = read_labeled(source, entry)
    images, kept, bad = [], [], []
    with Progress(f"{entry['name']}: decoding {source.name}", total=len(paths)) as meter:
        for index, image in _model_inputs(paths, size, meter, bad):
            kept.append(index)
            images.append(image)
    if not images:
        raise ValueError(f"task {entry['name']}: none of the {len(paths)} images of {source} could be decoded")
    return LabeledImages(source, np.stack(images), truth[kept], bad)


def task_metric(entry: dict, scores: np.ndarray, truth: np.ndarray) -> tuple[str, float]:
    """The kind's primary validation metric (AP, mAP, mean boundary AP) and its name."""
    metrics, primary = kind_of(entry["kind"]).validation_metrics(scores, truth)
    # ``is`` too: a NaN primary (no positives) is the very object of its entry, and NaN != NaN.
    return next((name for name, value in metrics.items() if value is primary or value == primary), "metric"), float(
        primary)


def calibration_images(sources: list[Path], count: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Up to ``count`` decodable images of folders (recursive), JSONL manifests or files, drawn
    from the sources in turn (each task's training data weighs the same, however large), each in
    a seeded random order (a folder sorted by class would otherwise calibrate on one class),
    preprocessed as the runtime does (uint8 NCHW, exact: the runtime's float32 holds the same
    integers); and the undecodable ones met on the way, with the reason."""
    rng = np.random.default_rng(seed)
    per_source = [[record.path for record in read_unlabeled(source)] if is_manifest(source) else list_images(source)
                  for source in map(Path, sources)]
    per_source = [[paths[index] for index in rng.permutation(len(paths))] for paths in per_source]
    # In turn: the first of every source, then the second of every source, ...
    paths = [path for turn in itertools.zip_longest(*per_source) for path in turn if path is not None]
    if not paths:
        raise ValueError(f"{', '.join(map(str, sources))}: no images found")
    images, bad = [], []
    with Progress("calibration images", total=min(count, len(paths))) as meter:
        for _, image in _model_inputs(paths, size, meter, bad):
            images.append(image)
            if len(images) == count:
                break
    if not images:
        raise ValueError(f"none of the {len(paths)} calibration images could be decoded")
    return np.stack(images), bad
