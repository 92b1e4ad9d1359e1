"""One task of a trained model scoring a pool of images, for active learning
(``waterdrop.curation.selection``).

The model is an exported ONNX file, run through the torch-free runtime, or a checkpoint or run
folder, run through the PyTorch network (no export needed; torch is imported only then). The
pool is a folder of unlabeled images or a JSONL manifest of labeled ones (``{"image", "labels",
"missing"}`` lines, as in tasks). Images are decoded in threads; an undecodable one is left
out and listed with the reason, never a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waterdrop.contract import output_name, outputs_of, task_entry
from waterdrop.imageio import ImageDecodeError, read_image, to_model_input
from waterdrop.kinds import kind_of
from waterdrop.progress import Progress
from waterdrop.records import is_manifest, read_labeled_manifest, read_unlabeled


@dataclass
class TaskInfo:
    """What selection needs to know about one task of a trained model."""

    entry: dict  # its entry in the ONNX metadata (name, kind, labels, negative_label, thresholds)
    decisions: list[str]  # the thresholded decisions, one per column of ``prob`` (none for graded)
    thresholds: np.ndarray | None  # per decision; None when none were chosen yet
    has_predicted_loss: bool

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def kind(self) -> str:
        return self.entry["kind"]

    def truth(self, names: list[str], missing: list[str]) -> np.ndarray:
        """A labeled image's truth per decision: 1, 0 or -1 (unknown)."""
        return kind_of(self.kind).decision_truth(self.entry, names, missing)


def task_info(entry: dict, output_keys: list[str]) -> TaskInfo:
    """From a task's entry in the ONNX metadata (or one built the same way from a checkpoint)."""
    kind = kind_of(entry["kind"])
    return TaskInfo(entry, kind.decisions(entry), kind.decision_thresholds(entry), "predicted_loss" in output_keys)


def _choose_task(names: list[str], wanted: str | None) -> str:
    if wanted is None and len(names) == 1:
        return names[0]
    if wanted is None or wanted not in names:
        raise ValueError(f"the model has tasks {', '.join(names)}; choose one with --task")
    return wanted


@dataclass
class TaskScorer:
    """One task of a trained model: ``run`` maps a float32 NCHW batch (RGB 0..255 at ``size``)
    to that task's outputs by key (``prob``, ``predicted_loss``, ...)."""

    task: TaskInfo
    size: int
    run: Callable[[np.ndarray], dict[str, np.ndarray]]


def open_model(path: str | Path, task: str | None = None) -> TaskScorer:
    """An exported ``.onnx`` file (torch-free), or a checkpoint / run folder (PyTorch)."""
    path = Path(path)
    if path.suffix == ".onnx":
        from waterdrop.runtime import Predictor

        predictor = Predictor(path)
        entries = {t["name"]: t for t in predictor.tasks}
        entry = entries[_choose_task(list(entries), task)]
        keys = [k for k in entry["outputs"] if k in ("prob", "predicted_loss")]

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            values = predictor.outputs(batch, [entry["outputs"][k] for k in keys])
            return {k: values[entry["outputs"][k]] for k in keys}

        return TaskScorer(task_info(entry, list(entry["outputs"])), predictor.size, run)
    from waterdrop.engine.checkpoint import best_checkpoint, load_net, recorded_thresholds

    checkpoint = best_checkpoint(path)
    net, cfg, meta = load_net(checkpoint)
    thresholds, _ = recorded_thresholds(checkpoint, meta)
    return scorer_from_net(net, cfg, _choose_task(cfg.task_names, task), thresholds or {})


def scorer_from_net(net, cfg, task: str, thresholds: dict) -> TaskScorer:
    """A task of an in-memory ``MultiTaskNet`` (``thresholds``: per task, as eval chose them)."""
    import torch

    config = next(t for t in cfg.tasks if t.name == task)
    net = net.eval()

    @torch.no_grad()
    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = net.forward_all(torch.from_numpy(batch))
        return {key: outputs[name].float().numpy() for key, name in outputs_of(task, list(outputs)).items()}

    size = cfg.model.input_size
    given = run(np.zeros((1, 3, size, size), np.float32))  # which outputs the task's features add
    entry = task_entry(task, kind_of(net.heads[task].kind), config.head_type, config.labels, config.negative_label,
                       {key: output_name(task, key) for key in given}, thresholds.get(task))
    return TaskScorer(task_info(entry, list(given)), size, run)


def read_pool(pool: str | Path, task: TaskInfo) -> tuple[list[Path], np.ndarray | None]:
    """Image paths, and the truth per decision (N, D) of a JSONL manifest (``{"image", "labels",
    "missing"}`` lines, paths relative to the file, as in tasks): 1, 0 or -1 unknown; None for a
    task without thresholded decisions. A folder is an unlabeled pool (searched recursively):
    truth None."""
    pool = Path(pool)
    if not is_manifest(pool):  # a folder; anything else is refused by the unlabeled reader
        return [record.path for record in read_unlabeled(pool)], None
    records = read_labeled_manifest(pool)
    rows = []
    for number, record in enumerate(records, 1) if task.decisions else ():
        try:
            rows.append(task.truth(record.labels, record.missing))
        except ValueError as err:
            raise ValueError(f"{pool}: image {number} ({record.path}): {err}") from err
    paths = [record.path for record in records]
    return paths, np.stack(rows) if rows else None


@dataclass
class PoolScores:
    paths: list[Path]  # the decoded images, in pool order
    probs: np.ndarray  # (N, L): P(positive) (L = 1), per-tag probabilities, or graded P(grade > k)
    predicted_loss: np.ndarray | None  # (N,)
    truth: np.ndarray | None  # (N, L) for a labeled pool
    undecodable: list[tuple[str, str]]  # (path, why)


def _decode(path: Path, size: int) -> np.ndarray | str:
    try:
        return read_image(path, size)
    except ImageDecodeError as err:
        return str(err)


def score_pool(
    scorer: TaskScorer, paths: list[Path], truth: np.ndarray | None = None, batch_size: int = 32, workers: int = 4
) -> PoolScores:
    """Run the model over the pool; images are decoded in ``workers`` threads (OpenCV releases
    the GIL). Undecodable ones are left out of the scores and listed with the reason."""
    kept, probs, losses, bad = [], [], [], []
    with ThreadPoolExecutor(max(1, workers)) as pool, Progress("score pool", total=len(paths)) as meter:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            images = []
            for offset, (path, image) in enumerate(zip(chunk, pool.map(_decode, chunk, [scorer.size] * len(chunk)))):
                if isinstance(image, str):
                    bad.append((str(path), image))
                else:
                    images.append(image)
                    kept.append(start + offset)
            if images:
                outputs = scorer.run(to_model_input(images, scorer.size))
                probs.append(np.asarray(outputs["prob"], dtype=np.float64).reshape(len(images), -1))
                if "predicted_loss" in outputs:
                    losses.append(np.asarray(outputs["predicted_loss"], dtype=np.float64))
            meter.update(len(chunk), failed=len(chunk) - len(images))
    columns = 1 if scorer.task.thresholds is None else len(scorer.task.thresholds)
    return PoolScores(
        paths=[paths[i] for i in kept],
        probs=np.concatenate(probs) if probs else np.zeros((0, columns)),
        predicted_loss=np.concatenate(losses) if losses else (np.zeros(0) if scorer.task.has_predicted_loss else None),
        truth=None if truth is None else truth[kept],
        undecodable=bad,
    )
