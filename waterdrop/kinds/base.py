"""The interface of a kind of task: everything that differs between binary decisions,
multi-label tags and graded scores after the head, in one place.

A head declares its ``kind`` by name; evaluation, the validation metric, export and the
runtime ask the kind, never branch on its name. A new kind is one new module here that
subclasses ``TaskKind`` and is decorated with ``@register_kind``. Kinds use numpy only
(the torch-free runtime imports them); plots import matplotlib when they are drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_KINDS: dict[str, TaskKind] = {}


def register_kind(cls: type[TaskKind]) -> type[TaskKind]:
    _KINDS[cls.name] = cls()
    return cls


def kind_of(name: str) -> TaskKind:
    if name not in _KINDS:
        raise ValueError(f"unknown kind of task '{name}'; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


class TaskKind:
    """One kind of task. ``scores`` and ``truth`` are what the head's ``score_and_truth``
    returns; ``task`` is the task's ``TaskConfig``; ``entry`` its entry in the ONNX metadata."""

    name: str = ""
    #: The ONNX metadata key under which export writes the chosen thresholds (None: none).
    threshold_key: str | None = None
    #: Whether the task YAML's ``deploy.target``, ``deploy.prevalence`` and ``deploy.label_targets``
    #: mean anything here.
    uses_target: bool = True
    uses_prevalence: bool = False
    uses_label_targets: bool = False
    #: The per-task samplers that make sense for this kind (``plain`` always does).
    samplers: tuple[str, ...] = ("plain",)
    #: The type of each field of ``runtime_result``, for tables such as a scan's columns:
    #: ``float32``, ``bool``, ``string``, ``strings`` (a list), ``scores`` (per-label float32 in
    #: label order), or ``constant`` (the same for every image, e.g. its threshold). A field
    #: not listed is stored as JSON.
    result_fields: dict[str, str] = {}

    def validation_metrics(self, scores: np.ndarray, truth: np.ndarray) -> tuple[dict[str, float], float]:
        """Metrics logged each epoch (short names), and the primary one (higher is better)
        that picks the best checkpoint (train.checkpoint: best)."""
        raise NotImplementedError

    def report(self, task, scores: np.ndarray, truth: np.ndarray, thresholds: Any = None) -> dict:
        """The evaluation report; decision thresholds are chosen for ``task.deploy`` unless given."""
        raise NotImplementedError

    def thresholds(self, report: dict) -> Any:
        """The decision thresholds a report chose (what export writes into the metadata)."""
        raise NotImplementedError

    def summary(self, report: dict) -> dict:
        """Headline figures, kept next to a test report for comparison with val."""
        raise NotImplementedError

    def format(self, task_name: str, report: dict) -> list[str]:
        """Human-readable lines of a report."""
        raise NotImplementedError

    def plot(self, out_dir: Path, task, report: dict, scores: np.ndarray, truth: np.ndarray) -> None:
        """PNG plots of a report under ``out_dir``."""

    def runtime_result(self, entry: dict, outputs: dict[str, np.ndarray], row: int, size: tuple[int, int]) -> dict:
        """One image's decision from the model's outputs for this task (``size`` = width, height)."""
        raise NotImplementedError

    def cam_views(self, entry: dict, result: dict, cam: np.ndarray,
                  every_label: bool) -> list[tuple[str | None, np.ndarray]]:
        """The heat maps worth drawing from one image's class activation map ``cam`` (the ONNX
        ``<task>.cam`` row), as (label or None, map (h, w)); ``result`` is the image's
        ``runtime_result``. One map of the task's decision or score."""
        return [(None, cam)]

    def label_probability(self, scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
        """Per sample, the probability the prediction gives the sample's own label (NaN when
        nothing of it is known); what noisy-label tools and loss-based outliers read.

        Raises:
            ValueError: for a kind without one (graded).
        """
        raise ValueError(f"per-sample label probability is defined for binary and multi-label tasks, not '{self.name}'")

    # Active learning (``waterdrop.curation.selection``) ranks images by their thresholded decisions.

    def decisions(self, entry: dict) -> list[str]:
        """Names of the thresholded decisions, one per column of the ``prob`` output; empty when
        the kind chooses no threshold."""
        return []

    def decision_thresholds(self, entry: dict) -> np.ndarray | None:
        """The thresholds of ``decisions`` from the entry (None when none were chosen yet)."""
        value = entry.get(self.threshold_key) if self.threshold_key else None
        if value is None:
            return None
        names = self.decisions(entry)
        return np.array([float(value[name]) for name in names] if isinstance(value, dict) else [float(value)])

    def decide(self, entry: dict, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """What the model decides per image (rows) and decision (columns, ``decisions``) from its
        outputs of the task (``prob`` and any other) at the entry's thresholds, comparable with
        the truth of ``decision_truth``; a kind without thresholds decides otherwise (graded: the
        grade index, one column)."""
        prob = outputs["prob"]
        return prob.reshape(len(prob), -1) >= self.decision_thresholds(entry)

    def decision_truth(self, entry: dict, names: list[str], missing: list[str]) -> np.ndarray:
        """A labeled image's truth per decision: 1, 0 or -1 (unknown).

        Raises:
            ValueError: an unknown or ill-formed label list.
        """
        raise NotImplementedError(f"{self.name} tasks have no thresholded decisions")
