"""Active learning: which images to label next, or which labeled images to re-check.

Strategies over one task of a trained model:

* ``band`` (confidence band). On an unlabeled pool: the images whose probability lies in
  the uncertain band [low, high] around the task's deploy threshold, closest to the
  threshold first. Closeness is measured in log-odds, ``|logit(p) - logit(threshold)|`` (the
  ``logodds_from_threshold`` column), so that a threshold of 0.99 gets as wide a band in
  confidence as one of 0.5. The default band holds the probabilities whose odds are within a
  factor of 3 of the threshold's odds (threshold 0.5: [0.25, 0.75]; 0.9: [0.75, 0.964]). When
  it holds fewer images than the budget, it is widened in the same order (the next closest to
  the threshold) until the budget is filled, and the summary says how far (``in_band`` marks
  the images beyond the default band); a band the user gave is kept as given. On labeled recalls (a
  JSONL manifest) the hard ones instead: positives scored below ``low`` and negatives scored
  above ``high``, the most confidently wrong (largest log-odds distance) first.
* ``loss`` (predicted loss): the task's loss prediction module (``loss_prediction`` in the
  task YAML) ranks the images by the loss it predicts for them, highest first.
* ``union``: both rankings interleaved (band 1st, loss 1st, band 2nd, loss 2nd, ...), each
  image once, cut at the budget.

Multi-label tasks: every tag has its own threshold and band. An image's band score is that
of its most uncertain tag (the in-band tag closest to its threshold), its hard score that of
its most confidently wrong tag (tags listed as ``missing`` are left out); the ``label``
column names that tag. Graded tasks have no threshold: only ``loss`` applies to them.

The pool is scored by ``waterdrop.curation.pool_scores`` (an ONNX file through the torch-free
runtime, or a checkpoint through PyTorch); ``select`` applies a strategy to its scores and
``write_selection`` writes one CSV per ranking, ``selected.csv`` at the budget and a summary.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from waterdrop.curation.pool_scores import PoolScores, TaskInfo

STRATEGIES = ("auto", "band", "loss", "union")
BAND_ODDS = 3.0
_EPS = 1e-6


def logit(p: np.ndarray | float) -> np.ndarray:
    """Log-odds, with probabilities clipped away from 0 and 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def default_band(thresholds: np.ndarray, odds: float = BAND_ODDS) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) per label: the probabilities whose odds lie within a factor ``odds`` of the threshold's."""
    centre, width = logit(thresholds), np.log(odds)
    return 1 / (1 + np.exp(-(centre - width))), 1 / (1 + np.exp(-(centre + width)))


@dataclass
class Ranking:
    """The images of a pool in the order a strategy would have them labeled."""

    strategy: str
    order: np.ndarray  # pool indices, the most worth labeling first
    scores: np.ndarray  # the strategy's score of each (see the module docstring), in that order
    tags: np.ndarray  # per listed image, the index of the label that decided (-1: none)


def _ranked(strategy: str, indices: np.ndarray, keys: np.ndarray, tags: np.ndarray, descending: bool) -> Ranking:
    order = np.lexsort((indices, -keys if descending else keys))  # ties keep pool order
    return Ranking(strategy, indices[order], keys[order], tags[order])


def _distance(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return np.abs(logit(probs) - logit(thresholds))


def band_ranking(probs: np.ndarray, thresholds: np.ndarray, low: np.ndarray | float = 0.0,
                 high: np.ndarray | float = 1.0) -> Ranking:
    """Images with some label's probability in [low, high], the closest to its threshold first
    (the default band [0, 1] ranks every image).

    Args:
        probs: (N, L) probabilities (L = 1 for a binary task).
        thresholds, low, high: (L,) per label, or scalars.
    """
    probs = np.asarray(probs, dtype=np.float64)
    distance = np.where((probs >= low) & (probs <= high), _distance(probs, thresholds), np.inf)
    tags = distance.argmin(axis=1)
    best = distance[np.arange(len(probs)), tags]
    keep = np.nonzero(np.isfinite(best))[0]
    return _ranked("band", keep, best[keep], tags[keep], descending=False)


def hard_ranking(
    probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray, low: np.ndarray, high: np.ndarray
) -> Ranking:
    """Labeled images the model gets confidently wrong: a positive label scored below ``low``
    or a negative one above ``high`` (unknown labels, -1, left out); the farthest from the
    threshold first.

    Args:
        probs: (N, L) probabilities; truth: (N, L) 1 / 0 / -1.
        thresholds, low, high: (L,) per label, or scalars.
    """
    probs = np.asarray(probs, dtype=np.float64)
    wrong = ((truth == 1) & (probs < low)) | ((truth == 0) & (probs > high))
    distance = np.where(wrong, _distance(probs, thresholds), -np.inf)
    tags = distance.argmax(axis=1)
    best = distance[np.arange(len(probs)), tags]
    keep = np.nonzero(np.isfinite(best))[0]
    return _ranked("hard", keep, best[keep], tags[keep], descending=True)


def loss_ranking(
    predicted_loss: np.ndarray, probs: np.ndarray | None = None, thresholds: np.ndarray | None = None
) -> Ranking:
    """Every image, the highest predicted loss first; with thresholds, ``tags`` name each
    image's label closest to its threshold (for the report)."""
    predicted_loss = np.asarray(predicted_loss, dtype=np.float64)
    indices = np.arange(len(predicted_loss))
    tags = np.full(len(indices), -1)
    if probs is not None and thresholds is not None:
        tags = _distance(probs, thresholds).argmin(axis=1)
    return _ranked("predicted_loss", indices, predicted_loss, tags, descending=True)


def union_ranking(rankings: list[Ranking], budget: int) -> list[tuple[int, Ranking, int]]:
    """The rankings interleaved, first of each, then second of each, ...; an image already
    taken is skipped; at most ``budget`` images. Returns (pool index, the ranking it was taken
    from, its position there)."""
    picked, seen = [], set()
    for position in range(max((len(r.order) for r in rankings), default=0)):
        for ranking in rankings:
            if position < len(ranking.order) and int(ranking.order[position]) not in seen:
                seen.add(int(ranking.order[position]))
                picked.append((int(ranking.order[position]), ranking, position))
                if len(picked) == budget:
                    return picked
    return picked


@dataclass
class Selection:
    rankings: list[Ranking]  # the band (or hard) ranking and / or the predicted-loss ranking
    selected: list[tuple[int, Ranking, int]]  # their union at the budget (see ``union_ranking``)
    thresholds: np.ndarray | None
    low: np.ndarray | None
    high: np.ndarray | None
    budget: int = 0
    notes: list[str] = field(default_factory=list)  # why the budget was widened, or not filled
    widened_to_odds: float | None = None  # the band as widened to fill the budget (odds factor)


def resolve_strategy(strategy: str, task: TaskInfo) -> str:
    """``auto``: the union when the model predicts losses (``loss`` alone for a task without
    thresholded decisions, such as a graded one), else the band."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    if strategy != "auto":
        return strategy
    if task.has_predicted_loss:
        return "union" if task.decisions else "loss"
    return "band"


def selection_plan(task: TaskInfo, budget: int, strategy: str = "auto", threshold: float | None = None,
         low: float | None = None, high: float | None = None) -> tuple[str, np.ndarray | None]:
    """The strategy ``select`` will run and the thresholds it uses. Called before the pool is
    scored too, so that what the task or the model cannot serve is refused at once.

    Raises:
        ValueError: a budget under 1, or a strategy the task or the model cannot serve; the
            message says what to do.
    """
    if budget < 1:
        raise ValueError(f"the budget must be at least 1 image, got {budget}")
    strategy = resolve_strategy(strategy, task)
    if threshold is not None and (not task.decisions or not 0 < threshold < 1):
        raise ValueError(f"--threshold {threshold}: needs a task with thresholded decisions ({task.name} is "
                         f"{task.kind}) and a probability strictly between 0 and 1")
    thresholds = np.full(len(task.decisions), float(threshold)) if threshold is not None else task.thresholds
    if strategy in ("band", "union"):
        if not task.decisions:
            raise ValueError(
                f"task {task.name} is {task.kind}: it chooses no threshold, hence no confidence band; use "
                "--strategy loss (the task needs loss_prediction)"
            )
        if thresholds is None:
            raise ValueError(
                f"no threshold recorded for task {task.name}; evaluate the checkpoint first "
                "(tools/eval.py records them) or pass --threshold"
            )
        _band(thresholds, low, high)  # a bad band is refused now too
    if strategy in ("loss", "union") and not task.has_predicted_loss:
        raise ValueError(
            f"the model has no {task.name}.predicted_loss output; set loss_prediction in the task "
            f"YAML (e.g. 'loss_prediction: {{}}' in tasks/{task.name}.yaml), retrain and export "
            "again, or use --strategy band"
        )
    return strategy, thresholds


def select(
    scores: PoolScores,
    task: TaskInfo,
    budget: int,
    strategy: str = "auto",
    low: float | None = None,
    high: float | None = None,
    threshold: float | None = None,
) -> Selection:
    """Rank the scored pool by ``strategy`` and take ``budget`` images.

    Args:
        scores: the pool as scored by ``pool_scores.score_pool``; with ``truth`` (a labeled
            manifest) the band strategy lists the hard recalls instead.
        task: the scored task.
        budget: how many images to select.
        strategy: ``band``, ``loss``, ``union`` or ``auto`` (see ``resolve_strategy``).
        low, high: the band for every label; by default odds within a factor of 3 of each
            label's threshold.
        threshold: replaces the model's thresholds (e.g. a checkpoint that was never evaluated).

    Raises:
        ValueError: a strategy the task or the model cannot serve, or a bad band; the message
            says what to do.
    """
    strategy, thresholds = selection_plan(task, budget, strategy, threshold, low, high)
    rankings, band, notes, widened = [], (None, None), [], None
    if strategy in ("band", "union"):
        band = _band(thresholds, low, high)
        if scores.truth is not None:
            rankings.append(hard_ranking(scores.probs, scores.truth, thresholds, *band))
        else:
            rankings.append(band_ranking(scores.probs, thresholds, *band))
        if len(rankings[0].order) < budget and strategy == "band" and scores.truth is None and len(scores.paths):
            if low is None and high is None:
                in_band = len(rankings[0].order)
                rankings[0] = band_ranking(scores.probs, thresholds)
                taken = rankings[0].scores[:budget]
                widened = float(np.exp(taken[-1])) if len(taken) else None
                notes.append(f"the default band (odds within {BAND_ODDS:g}x of the threshold's) held {in_band} "
                             f"image(s); widened in the same order, to odds within {widened:.3g}x, to fill the budget")
            else:
                notes.append(f"the band given (--low/--high) holds {len(rankings[0].order)} image(s), fewer than "
                             "the budget; widen it, or leave it out to let the default band widen itself")
    if strategy in ("loss", "union"):
        rankings.append(
            loss_ranking(scores.predicted_loss, scores.probs if thresholds is not None else None, thresholds)
        )
    selected = union_ranking(rankings, budget)
    if len(selected) < budget:
        if scores.truth is not None and strategy == "band":
            notes.append(f"only {len(rankings[0].order)} labeled image(s) are scored on the wrong side of the band "
                         "(the hard ones to re-check); the others agree with their labels")
        if len(selected) == len(scores.paths):
            notes.append(f"the pool holds only {len(scores.paths)} decodable image(s)" if len(scores.paths) else
                         "no image of the pool could be decoded")
    return Selection(rankings, selected, thresholds, *band, budget=budget, notes=notes, widened_to_odds=widened)


def _band(thresholds: np.ndarray, low: float | None, high: float | None) -> tuple[np.ndarray, np.ndarray]:
    default_low, default_high = default_band(thresholds)
    for name, value in (("low", low), ("high", high)):
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"--{name} must be a probability in [0, 1], got {value}")
    low_values = default_low if low is None else np.full_like(thresholds, low)
    high_values = default_high if high is None else np.full_like(thresholds, high)
    if (low_values >= high_values).any():
        raise ValueError(
            f"the band needs low < high, got low {low_values.round(4).tolist()} and high "
            f"{high_values.round(4).tolist()}"
        )
    return low_values, high_values


FIELDS = ["rank", "path", "prob", "threshold", "logodds_from_threshold", "in_band", "label", "truth",
          "predicted_loss"]


def _columns(scores: PoolScores, task: TaskInfo, selection: Selection, index: int, tag: int) -> dict:
    """The report columns of one image; ``tag`` is the label that decided (-1: none)."""
    column = tag if tag >= 0 else (0 if len(task.decisions) == 1 else None)
    known = column is not None
    prob = float(scores.probs[index, column]) if known else None
    threshold = float(selection.thresholds[column]) if known and selection.thresholds is not None else None
    banded = threshold is not None and selection.low is not None
    return {
        "path": str(scores.paths[index]),
        "prob": round(prob, 6) if known else "",
        "threshold": round(threshold, 6) if threshold is not None else "",
        "logodds_from_threshold": round(float(_distance(prob, threshold)), 6) if threshold is not None else "",
        "in_band": bool(selection.low[column] <= prob <= selection.high[column]) if banded else "",
        "label": task.decisions[column] if known else "",
        "truth": int(scores.truth[index, column]) if known and scores.truth is not None else "",
        "predicted_loss": "" if scores.predicted_loss is None else round(float(scores.predicted_loss[index]), 6),
    }


def write_selection(
    out_dir: str | Path, scores: PoolScores, task: TaskInfo, selection: Selection, pool: str = ""
) -> dict:
    """Write ``<ranking>.csv`` (``band``, ``hard`` or ``predicted_loss``: the whole ranking),
    ``selected.csv`` (the union at the budget, with the ranking each image was taken from),
    ``undecodable.txt`` when some image could not be read, and ``summary.json``; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for ranking in selection.rankings:
        files.append(f"{ranking.strategy}.csv")
        with open(out / files[-1], "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            for rank, (index, tag) in enumerate(zip(ranking.order, ranking.tags), 1):
                writer.writerow({"rank": rank, **_columns(scores, task, selection, index, tag)})
    with open(out / "selected.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["rank", "path", "picked_by", "rank_there", *FIELDS[2:]])
        writer.writeheader()
        for rank, (index, ranking, position) in enumerate(selection.selected, 1):
            writer.writerow(
                {
                    "rank": rank,
                    "picked_by": ranking.strategy,
                    "rank_there": position + 1,
                    **_columns(scores, task, selection, index, int(ranking.tags[position])),
                }
            )
    if scores.undecodable:
        (out / "undecodable.txt").write_text("".join(f"{path}\t{why}\n" for path, why in scores.undecodable))

    def listed(values):
        return None if values is None else [round(float(v), 6) for v in values]

    summary = {
        "task": task.name,
        "kind": task.kind,
        "pool": pool,
        "labeled_pool": scores.truth is not None,
        "scored": len(scores.paths),
        "undecodable": len(scores.undecodable),
        "undecodable_images": [path for path, _ in scores.undecodable],
        "thresholds": listed(selection.thresholds),
        "band_low": listed(selection.low),
        "band_high": listed(selection.high),
        "rankings": {r.strategy: len(r.order) for r in selection.rankings},
        "budget": selection.budget,
        "selected": len(selection.selected),
        "band_widened_to_odds": selection.widened_to_odds,
        "notes": selection.notes,
        "files": files + ["selected.csv"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
