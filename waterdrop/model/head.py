"""The one small interface every head implements."""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_BUILT_IN_ARGS = ("self", "in_channels", "labels", "negative_label")


class Head(nn.Module):
    """Base of all heads.

    A head reads the trunk's feature maps of one task and owns everything task-specific:
    how labels become targets, its loss terms and its deploy outputs.

    Args:
        in_channels: channels of every trunk feature level, shallow to deep.
        labels: the task's label names from its YAML.
        negative_label: the name normal images carry in the task's data.

    Subclasses take their YAML arguments as keyword-only parameters of ``__init__`` and
    validate them there (raise ``ValueError`` with the argument's name).
    """

    #: The kind of task (``waterdrop.kinds``): "binary", "multilabel" or "graded".
    kind: str = ""
    #: What the map of ``cam`` shows, in words (written into the ONNX metadata).
    cam_meaning: str = ""

    def __init__(self, in_channels: list[int], labels: list[str], negative_label: str):
        super().__init__()
        self.in_channels = list(in_channels)
        self.labels = list(labels)
        self.negative_label = negative_label

    @classmethod
    def config_args(cls) -> list[str]:
        """Names of the arguments a task YAML may set under ``head:``."""
        params = inspect.signature(cls.__init__).parameters
        return [n for n, p in params.items() if n not in _BUILT_IN_ARGS and p.kind is p.KEYWORD_ONLY]

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw outputs (logits) from the feature levels of this task's samples."""
        raise NotImplementedError

    def loss(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms per sample, keyed by term name (e.g. ``loss_cls``), each of shape (N,).
        Every name contains ``loss``: mmengine optimises only those keys (checked in training).

        The caller averages them; per-sample values let it mix targets (cutmix), leave out
        unlabeled samples and rank samples by loss (OHEM).
        """
        raise NotImplementedError

    def predict(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Deploy outputs; each key becomes the ONNX output ``<task>.<key>``."""
        raise NotImplementedError

    def cam(self, feats: list[torch.Tensor]) -> torch.Tensor | None:
        """Class activation map (Zhou et al., CVPR 2016) of the head's main decision, computed in
        the graph: (N, h, w), or (N, L, h, w) with one map per label, at the deepest level's
        resolution. Raw values (not normalised); None when this head cannot give one."""
        return None

    def explain_targets(self) -> list[str | None]:
        """What ``target_score`` can explain: None is the head's main decision or score, a
        label name that label's logit. Tools explain None alone by default where it is listed,
        else every label."""
        return []

    def target_score(self, outputs: dict[str, torch.Tensor], target: str | None) -> torch.Tensor:
        """The (N,) score that Grad-CAM differentiates for ``target`` (one of ``explain_targets``)."""
        raise ValueError(f"{type(self).__name__} has nothing to explain")

    def encode_target(self, names: list[str], missing: list[str]) -> np.ndarray:
        """Turn a sample's label names into this head's target array.

        Raises:
            ValueError: for an unknown or ill-formed label list; the caller adds file and line.
        """
        raise NotImplementedError

    def score_and_truth(self, predictions: dict[str, np.ndarray], target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ground truth for the task's kind: binary (N,), (N,); multi-label (N, L), (N, L)
        with -1 = unknown; graded P(grade > k) (N, K-1), grade index (N,)."""
        raise NotImplementedError

    def _check_known(self, names: list[str], allowed: list[str]) -> None:
        for name in names:
            if name not in allowed:
                raise ValueError(f"unknown label '{name}'; known labels: {', '.join(allowed)}")


def check_range(name: str, value: float, low: float, high: float) -> float:
    """Validate one numeric head argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """Global average pool of one feature map to (N, C)."""
    return feature.mean(dim=(2, 3))


def linear_map(layer: nn.Linear, feature: torch.Tensor) -> torch.Tensor:
    """``layer`` applied at every position of ``feature`` (N, C, h, w) -> (N, out, h, w). A linear
    layer commutes with the mean, so the map's spatial mean is ``layer(pooled(feature))``."""
    return F.conv2d(feature, layer.weight[:, :, None, None], layer.bias)


def mixed_terms(head: Head, outputs: dict, target: torch.Tensor, mix) -> dict[str, torch.Tensor]:
    """The head's per-sample loss terms; under cutmix ``mix = (second_target, lam)`` weighs both
    targets by area."""
    terms = head.loss(outputs, target)
    # mmengine optimises only the logged values whose key contains "loss"; anything else
    # would be shown in the logs and silently not trained.
    untrained = [term for term in terms if "loss" not in term]
    if untrained:
        raise ValueError(f"{type(head).__name__}.loss returned terms {untrained}; every term name must contain "
                         "'loss' (e.g. 'loss_cls'), or it is logged but never optimised")
    if mix is None:
        return terms
    second_target, lam = mix
    second = head.loss(outputs, second_target)
    return {k: lam * v + (1 - lam) * second[k] for k, v in terms.items()}
