"""Loss-based outliers: after a short training run, the training samples whose own label
keeps a low probability. They are listed for review, never dropped: they are wrong labels,
images the task cannot decide, or rare cases worth more data.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from waterdrop.curation.contact_sheet import contact_sheet
from waterdrop.curation.sample_losses import Phase, SampleLosses, constant


def short_run(epochs: int, lr: float) -> list[Phase]:
    """The short training run outliers are read from: the registry's lr after a warm-up."""
    if epochs < 2:
        raise ValueError("outliers need at least 2 epochs (the label probability must stay low over several)")
    return [Phase("short", epochs, constant(lr))]


def label_outliers(recorded: SampleLosses, max_prob: float = 0.3, settle_epochs: int = 1) -> np.ndarray:
    """Indices of samples whose label probability, averaged over the epochs after the first
    ``settle_epochs`` (while the network is still finding its feet), stays under
    ``max_prob``; lowest first. The average, not every epoch: one augmented view that
    happens to fit should not hide a wrong label."""
    late = recorded.label_prob[settle_epochs:]
    if not len(late):
        raise ValueError(f"{len(recorded.label_prob)} epoch(s) recorded; need more than settle_epochs={settle_epochs}")
    seen = np.isfinite(late).any(axis=0)
    mean = np.full(late.shape[1], np.inf)
    mean[seen] = np.nanmean(late[:, seen], axis=0)
    found = np.nonzero(mean < max_prob)[0]
    return found[np.argsort(mean[found], kind="stable")]


def write_outliers(recorded: SampleLosses, found: np.ndarray, out: Path, task_name: str, top: int = 64,
                   settle_epochs: int = 1) -> dict[str, Path]:
    """``<task>_outliers.csv`` (every outlier) and a contact sheet of the first ``top``; the
    mean probability shown is the one ``label_outliers`` chose them by (same ``settle_epochs``)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"outliers": out / f"{task_name}_outliers.csv"}
    # only the outliers' columns: a sample never drawn after settling is all NaN, and no outlier
    mean_prob = dict(zip(found.tolist(), np.nanmean(recorded.label_prob[settle_epochs:, found], axis=0)))
    with open(files["outliers"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "path", "labels", "label_prob_mean", "label_prob_last"])
        for position, i in enumerate(found, 1):
            record = recorded.records[i]
            writer.writerow([position, record.path, "|".join(record.labels), f"{mean_prob[i]:.4f}",
                             f"{recorded.label_prob[-1, i]:.4f}"])
    shown = found[:top]
    if len(shown):
        files["outlier_sheet"] = contact_sheet(
            [recorded.records[i].path for i in shown],
            [f"{','.join(recorded.records[i].labels) or '(none)'}\np(label) {mean_prob[i]:.2f}" for i in shown],
            out / f"{task_name}_outliers.png")
    return files
