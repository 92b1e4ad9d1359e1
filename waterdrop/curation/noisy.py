"""Rank a task's training labels by how likely they are wrong: O2U-Net (Huang et al., ICCV 2019).

After a normal training phase, the network is trained on with a cyclic learning rate (high
to low within each short cycle). Each jump back to a high rate knocks the network out of a
fit that memorised the noisy samples, so a wrongly labeled sample keeps a high loss over
the cycles while a clean one is re-learnt quickly. Every sample's loss is recorded at
every epoch of the cycles and normalised per epoch (minus that epoch's mean loss, so the
falling overall loss within a cycle does not weigh the epochs unequally); the samples are
ranked by the mean normalised loss, highest first.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waterdrop.curation.contact_sheet import contact_sheet
from waterdrop.curation.sample_losses import Phase, SampleLosses, constant, cyclic
from waterdrop.records import write_manifest


@dataclass
class O2USettings:
    """The phases of a ranking run.

    Args:
        normal_epochs: plain training first (0 when starting from a trained checkpoint).
        cycles: learning-rate cycles whose losses are recorded.
        cycle_epochs: epochs per cycle.
        lr_max: the cycles' (and the normal phase's) learning rate; None: the registry's lr.
        lr_min: the rate at the end of each cycle; None: lr_max / 100.
    """
    normal_epochs: int = 2
    cycles: int = 3
    cycle_epochs: int = 2
    lr_max: float | None = None
    lr_min: float | None = None

    def phases(self, registry_lr: float) -> list[Phase]:
        high = self.lr_max or registry_lr
        low = self.lr_min if self.lr_min is not None else high / 100
        if self.cycles < 2:
            # One cycle never jumps back to the high rate, which is what tells noisy samples apart.
            raise ValueError(f"cycles {self.cycles}: O2U ranks by the losses over several learning-rate cycles; "
                             "give at least 2 (default 3)")
        if self.cycle_epochs < 1 or self.normal_epochs < 0:
            raise ValueError("need cycle_epochs >= 1 and normal_epochs >= 0")
        phases = [Phase("cyclic", self.cycles * self.cycle_epochs, cyclic(high, low, self.cycle_epochs))]
        if self.normal_epochs:
            phases.insert(0, Phase("normal", self.normal_epochs, constant(high)))
        return phases


@dataclass
class NoisyRanking:
    """Samples ordered from most to least likely mislabeled (``order`` indexes ``records``).

    ``score``: mean per-epoch-normalised loss over the cycles; ``variance``: its variance
    over the cycle epochs; ``final_loss``: the loss at the last epoch before the cycles
    (the plain baseline a normally trained network gives; NaN without a normal phase).
    Undecodable samples are not ranked (``unranked``).
    """
    recorded: SampleLosses
    score: np.ndarray
    variance: np.ndarray
    final_loss: np.ndarray
    order: np.ndarray

    @property
    def records(self):
        return self.recorded.records


def o2u_scores(losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, samples) losses -> per-sample mean and variance of the per-epoch-normalised loss."""
    normalised = losses - np.nanmean(losses, axis=1, keepdims=True)
    seen = np.isfinite(normalised).any(axis=0)
    mean = np.full(losses.shape[1], np.nan)
    variance = np.full(losses.shape[1], np.nan)
    mean[seen] = np.nanmean(normalised[:, seen], axis=0)
    variance[seen] = np.nanvar(normalised[:, seen], axis=0)
    return mean, variance


def highest_first(values: np.ndarray) -> np.ndarray:
    """Indices of the finite ``values``, highest first (ties keep their order)."""
    finite = np.nonzero(np.isfinite(values))[0]
    return finite[np.argsort(-values[finite], kind="stable")]


def rank(recorded: SampleLosses) -> NoisyRanking:
    cyclic_rows = recorded.rows_of("cyclic")
    score, variance = o2u_scores(recorded.losses[cyclic_rows])
    normal_rows = recorded.rows_of("normal")
    final = recorded.losses[normal_rows[-1]] if len(normal_rows) else np.full(len(score), np.nan)
    return NoisyRanking(recorded, score, variance, final.astype(np.float64), highest_first(score))


def write_outputs(ranking: NoisyRanking, out: Path, task_name: str, top: int = 64,
                  drop_fraction: float = 0.0) -> dict[str, Path]:
    """The ranked CSV, a contact sheet of the ``top`` first, a JSON summary and, with
    ``drop_fraction`` > 0, a cleaned manifest without that fraction of the ranked samples.
    Nothing of the task's data is touched."""
    out.mkdir(parents=True, exist_ok=True)
    records, recorded = ranking.records, ranking.recorded
    files = {"ranking": out / f"{task_name}_ranking.csv", "summary": out / f"{task_name}_summary.json"}
    columns = {"score": ranking.score, "loss_mean": np.nanmean(recorded.losses[recorded.rows_of("cyclic")], axis=0),
               "loss_variance": ranking.variance, "final_normal_loss": ranking.final_loss,
               "label_prob_last": recorded.label_prob[-1]}
    # A column that is the same (or missing) for every ranked sample says nothing: left out
    # (final_normal_loss without a normal phase).
    ranked = ranking.order
    informative = {name: values for name, values in columns.items()
                   if len(ranked) and np.isfinite(values[ranked]).any() and np.nanstd(values[ranked]) > 0}
    with open(files["ranking"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "path", "labels", *informative])
        for position, i in enumerate(ranked, 1):
            writer.writerow([position, records[i].path, "|".join(records[i].labels),
                             *(f"{values[i]:.5f}" for values in informative.values())])
    shown = ranking.order[:top]
    if len(shown):
        files["contact_sheet"] = contact_sheet(
            [records[i].path for i in shown],
            [f"#{r} {','.join(records[i].labels) or '(none)'}\nscore {ranking.score[i]:.2f}"
             for r, i in enumerate(shown, 1)], out / f"{task_name}_top{len(shown)}.png")
    dropped = ranking.order[:round(drop_fraction * len(ranking.order))]
    if drop_fraction > 0:
        files["cleaned_manifest"] = out / f"{task_name}_cleaned_train.jsonl"
        left_out = set(dropped.tolist())
        write_manifest([r for i, r in enumerate(records) if i not in left_out], files["cleaned_manifest"])
    summary = {"task": task_name, "ranked": int(len(ranking.order)), "undecodable": recorded.undecodable,
               "skipped_batches": recorded.skipped_batches, "epochs": recorded.phases, "lrs": recorded.lrs,
               "dropped": int(len(dropped)), "columns_left_out": sorted(set(columns) - set(informative)),
               "files": {k: str(v) for k, v in files.items()}}
    files["summary"].write_text(json.dumps(summary, indent=2))
    return files
