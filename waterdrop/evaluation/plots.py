"""PR curves and confusion matrices as PNG files, for picking thresholds by eye."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from waterdrop.evaluation.metrics import negative_weight, pr_curve  # noqa: E402


def _mark_threshold(ax, precision, recall, thresholds, threshold) -> None:
    i = int(np.argmin(np.abs(thresholds - threshold)))
    ax.plot(recall[i], precision[i], "o", color="black")
    ax.annotate(f"t={threshold:.3f}", (recall[i], precision[i]), textcoords="offset points", xytext=(5, -12))


def binary_pr(path: Path, task: str, scores, truth, prevalence, threshold) -> None:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    p, r, t = pr_curve(scores, truth)
    ax.plot(r, p, label=f"validation mix ({truth.mean():.1%} positive)")
    _mark_threshold(ax, p, r, t, threshold)
    if prevalence:
        p, r, t = pr_curve(scores, truth, negative_weight(truth, prevalence))
        ax.plot(r, p, label=f"at deploy prevalence {prevalence:g}")
        _mark_threshold(ax, p, r, t, threshold)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title=f"{task}: precision-recall")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion(path: Path, task: str, counts: dict, threshold: float) -> None:
    matrix = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="black" if value < matrix.max() / 2 else "white")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "positive"], yticklabels=["normal", "positive"],
           xlabel="predicted", ylabel="true", title=f"{task} at t={threshold:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def multilabel_pr_grid(path: Path, task: str, scores, truth, labels, thresholds: dict) -> None:
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
    for ax, (j, label) in zip(axes.flat, enumerate(labels)):
        known = truth[:, j] >= 0
        if (truth[known, j] == 1).any():
            p, r, t = pr_curve(scores[known, j], truth[known, j])
            ax.plot(r, p)
            _mark_threshold(ax, p, r, t, thresholds[label])
        ax.set(title=label, xlim=(0, 1.02), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(f"{task}: precision (y) vs recall (x) per label")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_weight_curves(path: Path, rows: list[dict], task_names: list[str]) -> None:
    """The learned task-loss weights per epoch (``<task>.weight`` columns of results.csv)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in task_names:
        points = [(int(row["epoch"]), float(row[f"{name}.weight"])) for row in rows
                  if row.get(f"{name}.weight") not in (None, "")]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set(xlabel="epoch", ylabel="weight (mean over the epoch)", title="learned task-loss weights")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
