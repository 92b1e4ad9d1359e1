"""Which watermarked test images does a trained model miss, and are their marks nearly invisible at its input size?
And why do its test normals score high?

Replays every test positive of the quality suite's ``watermark`` task exactly as ``quality_suite.build`` made it
(same photos, same per-image generator, the suite's own ``watermark`` function), recording the layout, the
opacity and the image before and after the mark; measures how visible the mark is once both are resized to the
model's input; scores the test split with each trained run and breaks recall and AP down by layout and by
visibility.

The normals section replays the normals (and the positives) of test, val and train the same way, recording the
source photo, the output size and the crop each came from, and reports the normals' scores: their distribution,
the source photos ranked by their normals' mean score (with the positives made from the same photos), how
concentrated the false positives are, and whether anything but the mark (size, aspect, crop, JPEG) differs
between normals and positives or goes with the score. Contact sheets of the highest-scoring test and val normals,
the lowest-scoring test normals and the worst test photos go to ``--sheets``.

    # the earlier default recipe (no head convolution, lr 2e-3)
    python benchmarks/watermark_visibility.py [--run work_dirs/suite/default/watermark/{0,1,2}/run]
        [--data work_dirs/quality_suite] [--cache work_dirs/real_photos_cache] [--size 192]
        [--out work_dirs/watermark_visibility.md] [--sheets DIR (default: --out without its suffix)]
        [--splits test val train]
    # the current default (head convolution, lr 1e-3)
    python benchmarks/watermark_visibility.py --run work_dirs/suite/hc_lr1e3/watermark/{0,1,2}/run
        --out work_dirs/watermark_visibility/hc_lr1e3.md --sheets work_dirs/watermark_visibility

Prints markdown; writes the numbers as JSON next to ``--out`` (same name, ``.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_suite  # noqa: E402

from waterdrop.data.loaders import build_datasets  # noqa: E402
from waterdrop.engine.checkpoint import load_net  # noqa: E402
from waterdrop.evaluation.evaluate import predict_split  # noqa: E402
from waterdrop.evaluation.metrics import average_precision, average_ranks, roc_auc  # noqa: E402
from waterdrop.imageio import resize  # noqa: E402

TASK = "watermark"
SPLIT = "test"
SPLITS = ("test", "val", "train")
LAYOUTS = ("once-text", "once-logo", "diagonal", "tiled")
ASPECTS = {1.0: "1:1", 4 / 3: "4:3", 3 / 2: "3:2", 3 / 4: "3:4", 2 / 3: "2:3"}  # real_photos.output_size's choices
DEFAULT_RUNS = [Path(f"work_dirs/suite/default/watermark/{seed}/run") for seed in (0, 1, 2)]
MATCH_LIMIT = 2.0  # grey levels of mean absolute difference a JPEG at quality 95 stays within
TOP_NORMALS = 30  # the highest-scoring normals whose source photos the concentration check counts
WORST_PHOTOS = 5
SHEET_CELL = 256


class RecordingRandom(random.Random):
    """A generator that logs its ``choice``, ``uniform`` and ``randint`` draws (the draws themselves are unchanged).

    ``random`` is deliberately not overridden: ``random.Random`` would then rebuild ``_randbelow`` on it, and every
    ``choice`` and ``randint`` would draw differently from the generator that made the images.
    """

    def __init__(self, state):
        super().__init__()
        self.setstate(state)
        self.choices, self.uniforms, self.randints = [], [], []

    def choice(self, seq):
        picked = super().choice(seq)
        self.choices.append((tuple(seq), picked))
        return picked

    def uniform(self, a, b):
        drawn = super().uniform(a, b)
        self.uniforms.append(((a, b), drawn))
        return drawn

    def randint(self, a, b):
        drawn = super().randint(a, b)
        self.randints.append(((a, b), drawn))
        return drawn


def recording_watermark(original, records: list[dict]):
    """``quality_suite.watermark`` itself, run on a recording copy of the generator.

    The mark's draws depend on the image's shape only, so running the same function from the same generator
    state on a black and on a white canvas gives its alpha map (opacity x ink) without copying its logic.
    """

    def watermark(image: np.ndarray, rng: random.Random) -> np.ndarray:
        state = rng.getstate()
        recorder = RecordingRandom(state)
        clean = image.copy()
        marked = original(image, recorder)
        rng.setstate(recorder.getstate())  # the caller's generator goes on as if it had drawn itself
        on_black = original(np.zeros_like(clean), RecordingRandom(state))[..., 0].astype(np.float32)
        on_white = original(np.full_like(clean, 255), RecordingRandom(state))[..., 0].astype(np.float32)
        alpha = np.maximum(on_black, 255 - on_white) / 255
        layout = next(picked for seq, picked in recorder.choices if seq == ("once", "diagonal", "tiled"))
        if layout == "once":  # the ring logo draws its initial's letter; the text mark does not
            logo = any(seq == tuple("ABCDEFGHKMPRSTW") for seq, _ in recorder.choices)
            layout = "once-logo" if logo else "once-text"
        opacity = next(drawn for bounds, drawn in recorder.uniforms if bounds == (0.12, 0.45))
        records.append({"layout": layout, "opacity": opacity, "white": bool(on_black.max() > 0),
                        "clean": clean, "marked": marked, "alpha": alpha})
        return marked

    return watermark


def replay(data: Path, manifest: dict, photos: list[tuple[str, np.ndarray]], split: str, label: str) -> list[dict]:
    """Every ``split``/``label`` image on disk, rebuilt as ``quality_suite.build`` made it, with the source photo,
    output size and crop it came from and, for a positive, its mark recorded."""
    positive = label == "positive"
    identity = {id(image): pid for pid, image in photos}
    marks: list[dict] = []
    records: list[dict] = []
    original = quality_suite.watermark
    # make_image looks the function up by its module-level name at call time, so replacing it there suffices.
    quality_suite.watermark = recording_watermark(original, marks)
    try:
        for path in sorted((data / TASK / split / label).glob("*.jpg")):
            index = int(path.stem.split("_")[0])
            recorder = RecordingRandom(random.Random(f"{manifest['seed']}/{TASK}/{split}/{label}/{index}").getstate())
            # build() draws for a hard negative only for HARD_TASKS ("and" short-circuits); watermark is not one.
            replayed = quality_suite.make_image(TASK, positive, False, photos, recorder)
            # What make_image drew itself (the mark draws on its own recorder): output_size's randint and aspect
            # choice, the photo choice, then real_photos.crop's uniform (zoom), two randints (x, y) and the flip
            # (random(), not logged). Anything else means the suite changed under this replay.
            if len(recorder.uniforms) != 1 or len(recorder.randints) != 3:
                raise SystemExit(f"{path}: make_image drew {recorder.uniforms} {recorder.randints}; replay is stale")
            photo = next(picked for _, picked in recorder.choices if isinstance(picked, np.ndarray))
            aspect = next(picked for _, picked in recorder.choices if isinstance(picked, float))
            frac, ((_, x), (_, y)) = recorder.uniforms[0][1], recorder.randints[1:]
            height, width = replayed.shape[:2]
            photo_height, photo_width = photo.shape[:2]
            # The crop's size in photo pixels, as real_photos.crop computes it (it does not return it).
            full = min(photo_width / width, photo_height / height)
            crop_width, crop_height = max(1, round(width * full * frac)), max(1, round(height * full * frac))
            record = marks[-1] if positive else {}
            record.update({"path": path.resolve(), "label": label, "photo": identity[id(photo)], "width": width,
                           "height": height, "short": min(width, height), "aspect": ASPECTS[aspect], "frac": frac,
                           # source pixels per output pixel: below 1 the crop was enlarged (softer)
                           "scale": crop_width / width,
                           "centre_x": (x + crop_width / 2) / photo_width,
                           "centre_y": (y + crop_height / 2) / photo_height})
            records.append(record)
            on_disk = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if on_disk.shape != replayed.shape:
                record["match_error"], record["identical_encoded"] = float("inf"), False
                continue
            record["match_error"] = float(np.abs(on_disk.astype(np.float32) - replayed).mean())
            # The stricter check: encoded as build() wrote it, the replay must decode to the very same pixels.
            encoded = cv2.imdecode(cv2.imencode(".jpg", replayed, [cv2.IMWRITE_JPEG_QUALITY, 95])[1], cv2.IMREAD_COLOR)
            record["identical_encoded"] = bool(np.array_equal(encoded, on_disk))
    finally:
        quality_suite.watermark = original
    return records


def measure_visibility(record: dict, size: int) -> None:
    """How much the mark changes the model's input: the clean and the marked image resized as evaluation does."""
    clean = resize(record["clean"], size).astype(np.float32)
    marked = resize(record["marked"], size).astype(np.float32)
    difference = np.abs(marked - clean).mean(axis=2)
    ink = cv2.resize(record["alpha"], (size, size), interpolation=cv2.INTER_AREA)
    touched = ink > 0
    record["touched_fraction"] = float(touched.mean())
    record["mean_touched"] = float(difference[touched].mean()) if touched.any() else 0.0
    record["p99"] = float(np.percentile(difference, 99))
    record["p99_touched"] = float(np.percentile(difference[touched], 99)) if touched.any() else 0.0


def measure_content(record: dict, size: int) -> None:
    """Plain image statistics of the file at the model's input: does the normals' score go with any of them?"""
    image = resize(cv2.imread(str(record["path"]), cv2.IMREAD_COLOR), size)
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    record["detail"] = quality_suite.gradient_energy(image)  # mean |Laplacian|: fine texture, edges, text
    record["brightness"] = float(grey.mean())
    record["near_white"] = float((image.min(axis=2) > 220).mean())  # where most marks (70 % white) would sit
    record["saturation"] = float(cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[..., 1].mean())


def score_folder(net, cfg, folder: Path) -> tuple[dict, float]:
    """Per image path under ``folder`` (a split's positive/ and normal/), the run's positive probability, and the
    AP over them: the folder is scored as the task's test split."""
    tasks = [dataclasses.replace(t, test=folder) if t.name == TASK else t for t in cfg.tasks]
    # Workers off: this shares two cores with a running benchmark.
    cfg = dataclasses.replace(cfg, tasks=tasks, train=dataclasses.replace(cfg.train, num_workers=0))
    dataset = build_datasets(cfg, net, "test").datasets[cfg.task_names.index(TASK)]
    with torch.no_grad():
        predicted, skipped, _ = predict_split(net, cfg, "test")
    if skipped.get(TASK):  # a dropped image would shift every later score against its path
        raise SystemExit(f"{folder}: undecodable images {skipped[TASK]}")
    scores, truth = predicted[TASK]
    paths = [Path(r.path).resolve() for r in dataset.records[:dataset.labeled_count]]
    labels = np.array([r.labels == ["positive"] for r in dataset.records[:dataset.labeled_count]], dtype=int)
    if len(paths) != len(scores) or not np.array_equal(labels, truth.astype(int)):
        raise SystemExit(f"{folder}: the loader's order does not match its dataset's records")
    return dict(zip(paths, scores.astype(float))), average_precision(scores, truth)


def score_run(run: Path, data: Path, splits: list[str]) -> dict:
    """Per image path of ``splits``, the run's positive probability; its val threshold and recorded test AP."""
    evaluated = run / "eval" / "evaluated.json"
    # The checkpoint metrics.json was computed from (its best-val copy); epoch_3.pth when none is recorded.
    checkpoint = run / Path(json.loads(evaluated.read_text())["checkpoint"]).name if evaluated.exists() \
        else run / "epoch_3.pth"
    net, cfg, _ = load_net(checkpoint)
    scores, aps = {}, {}
    for split in splits:  # paths differ across splits: one dict holds them all
        by_path, aps[split] = score_folder(net, cfg, data / TASK / split)
        scores.update(by_path)
    return {"run": str(run), "checkpoint": str(checkpoint), "scores": scores,
            "threshold": json.loads((run / "eval" / "thresholds.json").read_text())[TASK],
            "recorded_ap": json.loads((run / "eval" / "metrics.json").read_text())[TASK]["ap"],
            "ap": aps[SPLIT], "ap_by_split": aps}


def group_stats(members: list[dict], normals: list[np.ndarray], runs: list[dict]) -> dict:
    """Count, mean opacity and visibility of a group of positives; per run its recall and its AP against all
    test normals (mean over runs)."""
    recalls, aps, aucs = [], [], []
    for run, normal_scores in zip(runs, normals):
        positive_scores = np.array([run["scores"][m["path"]] for m in members])
        recalls.append(float((positive_scores >= run["threshold"]).mean()))
        truth = np.r_[np.ones(len(positive_scores)), np.zeros(len(normal_scores))]
        aps.append(average_precision(np.r_[positive_scores, normal_scores], truth))
        aucs.append(roc_auc(np.r_[positive_scores, normal_scores], truth))
    return {"count": len(members), "opacity": float(np.mean([m["opacity"] for m in members])),
            "visibility": float(np.mean([m["visibility"] for m in members])),
            "p99": float(np.mean([m["p99"] for m in members])),
            "recall": float(np.mean(recalls)), "ap": float(np.mean(aps)), "auc": float(np.mean(aucs)),
            "recall_per_run": recalls, "ap_per_run": aps, "auc_per_run": aucs}


def table(title: str, rows: dict[str, dict]) -> list[str]:
    lines = [f"| {title} | positives | opacity | visibility | p99 | recall@val thr | AP vs all normals | ROC AUC |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in rows.items():
        lines.append(f"| {name} | {s['count']} | {s['opacity']:.3f} | {s['visibility']:.1f} | {s['p99']:.1f} | "
                     f"{s['recall']:.3f} | {s['ap']:.3f} | {s['auc']:.3f} |")
    return lines


def separation(values: np.ndarray, missed: np.ndarray) -> float:
    """ROC AUC of ``values`` telling found (high) from missed (low) positives: how well a measure explains misses."""
    found, lost = values[~missed], values[missed]
    if not len(found) or not len(lost):
        return float("nan")
    return float(((found[:, None] > lost[None]).sum() + 0.5 * (found[:, None] == lost[None]).sum())
                 / (len(found) * len(lost)))


def spearman(a, b) -> float:
    """Rank correlation (ties averaged)."""
    return float(np.corrcoef(average_ranks(np.asarray(a, float)), average_ranks(np.asarray(b, float)))[0, 1])


def attach_scores(records: list[dict], runs: list[dict]) -> None:
    """Each image's score per run, their mean (what photos and sheets are ranked by: the runs' thresholds differ,
    but their orders agree far more than their scales) and how many runs flag it at their val threshold."""
    for r in records:
        r["scores"] = [run["scores"][r["path"]] for run in runs]
        r["score"] = float(np.mean(r["scores"]))
        r["flagged"] = int(sum(s >= run["threshold"] for s, run in zip(r["scores"], runs)))


def distribution_row(split: str, label: str, records: list[dict], runs: list[dict]) -> str:
    """Quantiles of the scores (mean over runs of each run's quantile) and the images at or above each run's
    val threshold."""
    per_run = np.array([[r["scores"][k] for r in records] for k in range(len(runs))])
    quantiles = np.percentile(per_run, [10, 25, 50, 75, 90], axis=1).mean(axis=1)
    flagged = [int((per_run[k] >= run["threshold"]).sum()) for k, run in enumerate(runs)]
    return (f"| {split} | {label} | {len(records)} | " + " | ".join(f"{q:.3f}" for q in quantiles)
            + f" | {per_run.max(axis=1).mean():.3f} | {'/'.join(map(str, flagged))} | "
            f"{np.mean(flagged) / len(records):.2f} |")


def photo_rows(normals: list[dict], positives: list[dict], runs: list[dict]) -> list[dict]:
    """Per source photo: its normals' mean score and share flagged (over runs), and the positives made from it:
    their mean score, recall and ROC AUC against its own normals (mean over runs). Worst photo first."""
    rows = []
    for photo in sorted({r["photo"] for r in normals + positives}):
        own = [r for r in normals if r["photo"] == photo]
        marked = [r for r in positives if r["photo"] == photo]
        aucs = [roc_auc(np.r_[[r["scores"][k] for r in marked], [r["scores"][k] for r in own]],
                        np.r_[np.ones(len(marked)), np.zeros(len(own))]) for k in range(len(runs))]
        rows.append({"photo": photo, "normals": len(own),
                     "score": float(np.mean([r["score"] for r in own])) if own else float("nan"),
                     "flagged": sum(r["flagged"] for r in own) / (len(own) * len(runs)) if own else float("nan"),
                     "positives": len(marked),
                     "positive_score": float(np.mean([r["score"] for r in marked])) if marked else float("nan"),
                     "recall": sum(r["flagged"] for r in marked) / max(1, len(marked) * len(runs)),
                     "auc_own_normals": float(np.mean(aucs))})
    return sorted(rows, key=lambda row: -row["score"] if row["normals"] else np.inf)


def worst_share(scores: np.ndarray, photos: np.ndarray) -> tuple[float, list[str]]:
    """The share of the TOP_NORMALS highest-scoring normals whose photo is one of the WORST_PHOTOS photos with the
    highest mean normal score, and those photos."""
    means = {photo: scores[photos == photo].mean() for photo in set(photos)}
    worst = sorted(means, key=lambda photo: -means[photo])[:WORST_PHOTOS]
    return float(np.isin(photos[np.argsort(-scores)[:TOP_NORMALS]], worst).mean()), worst


def between_photo_share(scores: np.ndarray, photos: np.ndarray) -> float:
    """Eta squared: the share of the variance of the normals' logit scores that lies between their photos."""
    logits = np.log(np.clip(scores, 1e-6, 1 - 1e-6) / np.clip(1 - scores, 1e-6, 1))
    between = sum((photos == p).sum() * (logits[photos == p].mean() - logits.mean()) ** 2 for p in set(photos))
    return float(between / ((logits - logits.mean()) ** 2).sum())


def ap_without(positive_scores: np.ndarray, normal_scores: np.ndarray, dropped: np.ndarray) -> float:
    kept = normal_scores[~dropped]
    return average_precision(np.r_[positive_scores, kept], np.r_[np.ones(len(positive_scores)), np.zeros(len(kept))])


def concentration(normals: list[dict], positives: list[dict], runs: list[dict]) -> dict:
    """How much of the normals' high scores their source photos explain, each against a shuffle of the photo
    labels over the normals (same photo sizes): a photo effect is what beats the shuffle."""
    scores = np.array([r["score"] for r in normals])
    photos = np.array([r["photo"] for r in normals])
    top_share, worst = worst_share(scores, photos)
    draws = np.random.default_rng(0)
    shuffled = [photos[draws.permutation(len(photos))] for _ in range(1000)]
    null_top = [worst_share(scores, p)[0] for p in shuffled]
    null_eta = [between_photo_share(scores, p) for p in shuffled]
    in_worst = np.isin(photos, worst)
    flagged = np.array([r["flagged"] for r in normals])
    # Split half: does one crop of a photo predict another? Even- vs odd-numbered normals of each photo.
    halves = [(np.mean([r["score"] for r in own[0::2]]), np.mean([r["score"] for r in own[1::2]]))
              for own in ([r for r in normals if r["photo"] == p] for p in sorted(set(photos))) if len(own) >= 2]
    rows = [row for row in photo_rows(normals, positives, runs) if row["normals"] and row["positives"]]
    # AP when the worst photos' normals are left out, beside as many normals left out at random: what those
    # photos cost (the worst are picked on these very scores, so this is the most a fix for them could gain).
    without_worst, without_random = [], []
    for k in range(len(runs)):
        normal_scores = np.array([r["scores"][k] for r in normals])
        positive_scores = np.array([r["scores"][k] for r in positives])
        without_worst.append(ap_without(positive_scores, normal_scores, in_worst))
        random_aps = []
        for _ in range(200):
            dropped = np.zeros(len(normals), bool)
            dropped[draws.choice(len(normals), in_worst.sum(), replace=False)] = True
            random_aps.append(ap_without(positive_scores, normal_scores, dropped))
        without_random.append(float(np.mean(random_aps)))
    return {"worst_photos": worst, "worst_normals": int(in_worst.sum()), "normals": len(normals),
            "top_share": top_share, "top_share_shuffled": float(np.mean(null_top)),
            "top_share_shuffled_p95": float(np.percentile(null_top, 95)),
            "flagged_share": float(flagged[in_worst].sum() / max(1, flagged.sum())), "flagged": int(flagged.sum()),
            "eta2": between_photo_share(scores, photos), "eta2_shuffled": float(np.mean(null_eta)),
            "eta2_shuffled_p95": float(np.percentile(null_eta, 95)),
            "split_half": spearman(*zip(*halves)), "split_half_photos": len(halves),
            "normal_vs_positive_photo_means": spearman([r["score"] for r in rows], [r["positive_score"] for r in rows]),
            "ap": [average_precision(np.r_[[r["scores"][k] for r in positives], [r["scores"][k] for r in normals]],
                                     np.r_[np.ones(len(positives)), np.zeros(len(normals))])
                   for k in range(len(runs))],
            "ap_without_worst_normals": without_worst, "ap_without_random_normals": without_random}


PROPERTIES = {"short": "short side (px)", "aspect_ratio": "width / height", "frac": "crop zoom (frac of max crop)",
              "scale": "source px per output px", "centre_x": "crop centre x (of photo)",
              "centre_y": "crop centre y (of photo)", "detail": "mean |Laplacian| at input",
              "brightness": "mean grey at input", "near_white": "near-white share at input",
              "saturation": "mean HSV saturation at input"}


def normals_section(split: str, normals: list[dict], positives: list[dict], runs: list[dict]) -> tuple[list, dict]:
    """The normals analysis of one split: photos, concentration, and normals vs positives apart from the mark."""
    for r in normals + positives:
        r["aspect_ratio"] = r["width"] / r["height"]
    rows = photo_rows(normals, positives, runs)
    c = concentration(normals, positives, runs)
    identical = sum(r["identical_encoded"] for r in normals)
    lines = [f"### {split}: {len(normals)} normals from {len({r['photo'] for r in normals})} photos; {identical} "
             "identical to their file once replayed and encoded as JPEG 95 like build() (the positives' pipeline "
             "less the mark)", "",
             "| photo | normals | mean score | flagged@val thr | positives | positives' mean score | recall@val thr "
             "| ROC AUC vs own normals |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows[:10]:
        lines.append(f"| {row['photo']} | {row['normals']} | {row['score']:.3f} | {row['flagged']:.2f} | "
                     f"{row['positives']} | {row['positive_score']:.3f} | {row['recall']:.2f} | "
                     f"{row['auc_own_normals']:.2f} |")
    rest = rows[10:]
    rest_normals = [r for r in normals if r["photo"] in {row["photo"] for row in rest}]
    rest_positives = [r for r in positives if r["photo"] in {row["photo"] for row in rest}]
    lines.append(f"| the other {len(rest)} photos | {len(rest_normals)} | "
                 f"{np.mean([r['score'] for r in rest_normals]):.3f} | "
                 f"{sum(r['flagged'] for r in rest_normals) / (len(rest_normals) * len(runs)):.2f} | "
                 f"{len(rest_positives)} | {np.mean([r['score'] for r in rest_positives]):.3f} | "
                 f"{sum(r['flagged'] for r in rest_positives) / (len(rest_positives) * len(runs)):.2f} | |")
    lines += ["", f"Concentration: the {WORST_PHOTOS} worst photos hold {c['worst_normals']} of {c['normals']} normals "
              f"({c['worst_normals'] / c['normals']:.0%}), {c['top_share']:.0%} of the top {TOP_NORMALS} normals "
              f"(photo labels shuffled: {c['top_share_shuffled']:.0%}, p95 {c['top_share_shuffled_p95']:.0%}) and "
              f"{c['flagged_share']:.0%} of the {c['flagged']} normal flags at the val thresholds (all runs). "
              f"Between-photo share of the logit-score variance {c['eta2']:.2f} (shuffled {c['eta2_shuffled']:.2f}, "
              f"p95 {c['eta2_shuffled_p95']:.2f}); split half (photo mean of its even vs odd normals, "
              f"{c['split_half_photos']} photos) Spearman {c['split_half']:.2f}; photo mean of normals vs of "
              f"positives Spearman {c['normal_vs_positive_photo_means']:.2f}.", "",
              f"{split} AP per run {' / '.join(f'{a:.4f}' for a in c['ap'])}; without the {c['worst_normals']} normals "
              f"of the {WORST_PHOTOS} worst photos {' / '.join(f'{a:.4f}' for a in c['ap_without_worst_normals'])}; "
              f"without as many random normals (mean of 200) "
              f"{' / '.join(f'{a:.4f}' for a in c['ap_without_random_normals'])}.", "",
              "| aspect | normals | positives | normals' mean score | normals flagged | positives' mean score | "
              "positives' recall |", "|---|---:|---:|---:|---:|---:|---:|"]
    by_aspect = {}
    for name in ASPECTS.values():
        own = [r for r in normals if r["aspect"] == name]
        marked = [r for r in positives if r["aspect"] == name]
        by_aspect[name] = {"normals": len(own), "positives": len(marked),
                           "normal_score": float(np.mean([r["score"] for r in own])) if own else float("nan"),
                           "normal_flagged": sum(r["flagged"] for r in own) / max(1, len(own) * len(runs)),
                           "positive_score": float(np.mean([r["score"] for r in marked])) if marked else float("nan"),
                           "recall": sum(r["flagged"] for r in marked) / max(1, len(marked) * len(runs))}
        a = by_aspect[name]
        lines.append(f"| {name} | {a['normals']} | {a['positives']} | {a['normal_score']:.3f} | "
                     f"{a['normal_flagged']:.2f} | {a['positive_score']:.3f} | {a['recall']:.2f} |")
    # Detail (mean |Laplacian|) is the property the scores follow, in opposite directions for the two classes:
    # the terciles (edges over normals and positives together) show where the classes stop being separable.
    detail_edges = np.percentile([r["detail"] for r in normals + positives], [100 / 3, 200 / 3])
    lines += ["", "| detail tercile (mean abs Laplacian) | normals | normals' mean score | normals flagged | positives "
              "| positives' mean score | positives' recall | ROC AUC |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_detail = {}
    for t, name in enumerate(("low", "middle", "high")):
        own = [r for r in normals if np.searchsorted(detail_edges, r["detail"]) == t]
        marked = [r for r in positives if np.searchsorted(detail_edges, r["detail"]) == t]
        aucs = [roc_auc(np.r_[[r["scores"][k] for r in marked], [r["scores"][k] for r in own]],
                        np.r_[np.ones(len(marked)), np.zeros(len(own))]) for k in range(len(runs))]
        d = by_detail[name] = {
            "normals": len(own), "normal_score": float(np.mean([r["score"] for r in own])),
            "normal_flagged": sum(r["flagged"] for r in own) / max(1, len(own) * len(runs)),
            "positives": len(marked), "positive_score": float(np.mean([r["score"] for r in marked])),
            "recall": sum(r["flagged"] for r in marked) / max(1, len(marked) * len(runs)), "auc": float(np.mean(aucs))}
        low = f"{detail_edges[t - 1]:.1f}" if t else "0"
        high = f"{detail_edges[t]:.1f}" if t < 2 else "max"
        lines.append(f"| {name} ({low}-{high}) | {d['normals']} | {d['normal_score']:.3f} | "
                     f"{d['normal_flagged']:.2f} | {d['positives']} | {d['positive_score']:.3f} | {d['recall']:.2f} | "
                     f"{d['auc']:.3f} |")
    text = [r for r in normals if quality_suite.has_scene_text(r["photo"])]
    top = sorted(normals, key=lambda r: -r["score"])[:TOP_NORMALS]
    lines += ["", f"Normals from scene-text photos (quality_suite.has_scene_text): {len(text)}, mean score "
              f"{np.mean([r['score'] for r in text]) if text else float('nan'):.3f}, flagged "
              f"{sum(r['flagged'] for r in text) / max(1, len(text) * len(runs)):.2f}; "
              f"{sum(quality_suite.has_scene_text(r['photo']) for r in top)} of the top "
              f"{TOP_NORMALS} normals."]
    lines += ["", "| property | normals: mean (p25-p75) | positives: mean (p25-p75) | Spearman with score: normals "
              "| positives |", "|---|---:|---:|---:|---:|"]
    properties = {}
    for key, name in PROPERTIES.items():
        n, p = np.array([r[key] for r in normals]), np.array([r[key] for r in positives])
        properties[key] = {"normals": float(n.mean()), "positives": float(p.mean()),
                           "spearman_normals": spearman(n, [r["score"] for r in normals]),
                           "spearman_positives": spearman(p, [r["score"] for r in positives])}
        lines.append(f"| {name} | {n.mean():.3g} ({np.percentile(n, 25):.3g}-{np.percentile(n, 75):.3g}) | "
                     f"{p.mean():.3g} ({np.percentile(p, 25):.3g}-{np.percentile(p, 75):.3g}) | "
                     f"{properties[key]['spearman_normals']:+.2f} | {properties[key]['spearman_positives']:+.2f} |")
    return lines, {"photos": rows, "concentration": c, "by_aspect": by_aspect, "properties": properties,
                   "by_detail": by_detail, "detail_edges": detail_edges.tolist(),
                   "identical_encoded": identical}


def cell(image: np.ndarray, captions: list[str]) -> np.ndarray:
    """The image fitted into a SHEET_CELL square (aspect kept) over a caption strip."""
    height, width = image.shape[:2]
    factor = SHEET_CELL / max(height, width)
    thumb = cv2.resize(image, (round(width * factor), round(height * factor)), interpolation=cv2.INTER_AREA)
    canvas = np.full((SHEET_CELL + 18 * len(captions) + 4, SHEET_CELL, 3), 32, np.uint8)
    top, left = (SHEET_CELL - thumb.shape[0]) // 2, (SHEET_CELL - thumb.shape[1]) // 2
    canvas[top:top + thumb.shape[0], left:left + thumb.shape[1]] = thumb
    for k, caption in enumerate(captions):
        cv2.putText(canvas, caption[:38], (4, SHEET_CELL + 16 + 18 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def grid(cells: list[np.ndarray], columns: int) -> np.ndarray:
    blank = np.full_like(cells[0], 64)
    rows = [cells[k:k + columns] for k in range(0, len(cells), columns)]
    return np.vstack([np.hstack(row + [blank] * (columns - len(row))) for row in rows])


def image_cell(record: dict, runs: list[dict]) -> np.ndarray:
    return cell(cv2.imread(str(record["path"]), cv2.IMREAD_COLOR),
                [f"{record['label'][:3]} {record['path'].name} {record['width']}x{record['height']} "
                 f"s={record['score']:.3f} {record['flagged']}/{len(runs)}", record["photo"]])


def write_sheets(folder: Path, replayed: dict, runs: list[dict], photo_files: dict, rows: dict) -> list[Path]:
    """The 16 highest-scoring test and val normals, the 16 lowest-scoring test normals, and per worst test photo
    the photo, its normals and the positives made from it."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, split, worst_first in (("top_normals", "test", True), ("top_normals_val", "val", True),
                                     ("bottom_normals", "test", False)):
        if split not in replayed:
            continue
        ranked = sorted(replayed[split]["normal"], key=lambda r: -r["score"] if worst_first else r["score"])
        cv2.imwrite(str(folder / f"{name}.png"), grid([image_cell(r, runs) for r in ranked[:16]], 4))
        written.append(folder / f"{name}.png")
    sheet_rows = []
    for row in rows["test"][:WORST_PHOTOS]:
        photo = cv2.imread(str(photo_files[row["photo"]]), cv2.IMREAD_COLOR)
        own = sorted((r for r in replayed["test"]["normal"] if r["photo"] == row["photo"]), key=lambda r: -r["score"])
        marked = [r for r in replayed["test"]["positive"] if r["photo"] == row["photo"]]
        cells = [cell(photo, [f"source photo, normals' mean {row['score']:.3f}", row["photo"]])]
        cells += [image_cell(r, runs) for r in own[:4]] + [image_cell(r, runs) for r in marked[:3]]
        sheet_rows.append(grid(cells + [np.full_like(cells[0], 64)] * (8 - len(cells)), 8))
    cv2.imwrite(str(folder / "worst_photos.png"), np.vstack(sheet_rows))
    return written + [folder / "worst_photos.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, nargs="+", default=DEFAULT_RUNS)
    parser.add_argument("--data", type=Path, default=Path("work_dirs/quality_suite"))
    parser.add_argument("--cache", type=Path, default=Path("work_dirs/real_photos_cache"))
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--out", type=Path, default=Path("work_dirs/watermark_visibility.md"))
    parser.add_argument("--sheets", type=Path, help="folder for the contact sheets (default: --out less its suffix)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS,
                        help="splits whose normals are analysed (test always)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    splits = [SPLIT] + [s for s in args.splits if s != SPLIT]

    manifest = json.loads((args.data / "manifest.json").read_text())
    photo_files = quality_suite.cache_all(args.cache)
    replayed = {}
    for split in splits:
        photos = [(pid, cv2.imread(str(photo_files[pid]), cv2.IMREAD_COLOR)) for pid in manifest["splits"][split]]
        replayed[split] = {label: replay(args.data, manifest, photos, split, label)
                           for label in ("positive", "normal")}
        for p in replayed[split]["positive"]:
            measure_visibility(p, args.size)
            # The main visibility: the mark's mean contrast where it lies. A whole-image percentile misses marks
            # smaller than 1 % of the input (a small ring logo), and the peak of a mark says less than its average.
            p["visibility"] = p["mean_touched"]
            for key in ("clean", "marked", "alpha"):  # the train split's would fill the memory
                del p[key]
        for r in replayed[split]["positive"] + replayed[split]["normal"]:
            measure_content(r, args.size)
    positives = replayed[SPLIT]["positive"]
    matched = sum(p["match_error"] < MATCH_LIMIT for p in positives)
    identical = sum(p["identical_encoded"] for p in positives)
    runs = [score_run(run, args.data, splits) for run in args.run]
    normal_paths = sorted(Path(p).resolve() for p in (args.data / TASK / SPLIT / "normal").glob("*.jpg"))
    normals = [np.array([run["scores"][path] for path in normal_paths]) for run in runs]
    for p in positives:
        p["scores"] = [run["scores"][p["path"]] for run in runs]
        p["missed_by"] = int(sum(s < run["threshold"] for s, run in zip(p["scores"], runs)))

    lines = [f"# Watermark test positives at {args.size} px: {len(positives)} replayed; {identical} identical to "
             f"their file once encoded as JPEG 95 like build(); {matched} within {MATCH_LIMIT:g} grey levels mean abs "
             f"difference before encoding (worst {max(p['match_error'] for p in positives):.2f}: JPEG error of "
             "textured photos)", ""]
    for run in runs:
        run["ap_equals_recorded"] = abs(run["ap"] - run["recorded_ap"]) < 1e-6
    lines.append("Runs (test AP recomputed here vs eval/metrics.json, equal within 1e-6?): " + "; ".join(
        f"{Path(r['run']).parent.name}: {r['ap']:.6f} vs {r['recorded_ap']:.6f} "
        f"({'equal' if r['ap_equals_recorded'] else 'DIFFERS'}), val threshold {r['threshold']:.3f}" for r in runs))
    lines += ["", "visibility: mean |marked - clean| (grey levels) over the input pixels the mark touches; p99: 99th "
              "percentile of that difference over the whole input. Recall, AP and ROC AUC: mean over runs. A group's "
              "AP falls with its share of positives, so compare AP across equal-sized groups (quartiles) only; ROC "
              "AUC does not depend on it.", ""]
    by_layout = {name: group_stats([p for p in positives if p["layout"] == name], normals, runs) for name in LAYOUTS}
    lines += table("layout", by_layout) + [""]
    edges = np.percentile([p["visibility"] for p in positives], [25, 50, 75])
    quartile_of = [int(np.searchsorted(edges, p["visibility"], side="right")) for p in positives]
    by_quartile = {}
    for q in range(4):
        low = f"{edges[q - 1]:.1f}" if q else "0"
        high = f"{edges[q]:.1f}" if q < 3 else "max"
        by_quartile[f"Q{q + 1} ({low}-{high})"] = group_stats(
            [p for p, k in zip(positives, quartile_of) if k == q], normals, runs)
    lines += table("visibility quartile", by_quartile) + [""]

    missed = np.array([p["missed_by"] > 0 for p in positives])
    measures = {name: separation(np.array([p[name] for p in positives]), missed)
                for name in ("mean_touched", "p99", "p99_touched", "opacity")}
    lines.append(f"Positives missed by at least one run: {int(missed.sum())}. How well each measure ranks found above "
                 "missed (ROC AUC): " + ", ".join(f"{k} {v:.2f}" for k, v in measures.items()))

    # The ceiling of test AP once the faintest marks are set aside; beside it, dropping as many positives chosen
    # by the model's own lowest scores (the most any removal of that size could gain).
    visibility = np.array([p["visibility"] for p in positives])
    removal = {}
    for percent in (10, 20):
        faint = visibility < np.percentile(visibility, percent)
        without_faint, without_lowest, without_random = [], [], []
        for run, normal_scores in zip(runs, normals):
            scores = np.array([run["scores"][p["path"]] for p in positives])
            # Removing positives at all lowers AP (fewer positives per normal): the baseline is a random removal.
            draws = np.random.default_rng(0)
            random_aps = []
            for _ in range(200):
                kept = np.ones(len(scores), bool)
                kept[draws.choice(len(scores), faint.sum(), replace=False)] = False
                truth = np.r_[np.ones(kept.sum()), np.zeros(len(normal_scores))]
                random_aps.append(average_precision(np.r_[scores[kept], normal_scores], truth))
            without_random.append(float(np.mean(random_aps)))
            lowest_scored = np.ones(len(scores), bool)
            lowest_scored[np.argsort(scores)[:faint.sum()]] = False
            for kept, store in ((~faint, without_faint), (lowest_scored, without_lowest)):
                truth = np.r_[np.ones(kept.sum()), np.zeros(len(normal_scores))]
                store.append(average_precision(np.r_[scores[kept], normal_scores], truth))
        removal[percent] = {"removed": int(faint.sum()), "ap_without_faintest": without_faint,
                            "ap_without_random": without_random, "ap_without_lowest_scored": without_lowest}
    all_ap = [r["ap"] for r in runs]
    lines += ["", "| test AP (per run; mean) | removed positives | " + " | ".join(
        Path(r["run"]).parent.name for r in runs) + " | mean |", "|---|---:|" + "---:|" * (len(runs) + 1)]
    lines.append("| all positives | 0 | " + " | ".join(f"{a:.4f}" for a in all_ap) + f" | {np.mean(all_ap):.4f} |")
    for percent, r in removal.items():
        for key, label in (("ap_without_faintest", f"visibility below p{percent}"),
                           ("ap_without_random", "as many random (mean of 200)"),
                           ("ap_without_lowest_scored", "as many lowest-scored")):
            lines.append(f"| without {label} | {r['removed']} | " + " | ".join(f"{a:.4f}" for a in r[key])
                         + f" | {np.mean(r[key]):.4f} |")

    lowest = sorted((p for p in positives if p["missed_by"]), key=lambda p: np.mean(p["scores"]))[:10]
    lines += ["", "Missed positives with the lowest mean score:", "",
              "| file | layout | colour | opacity | visibility | p99 | touched | mean score | missed by |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for p in lowest:
        lines.append(f"| {p['path'].name} | {p['layout']} | {'white' if p['white'] else 'black'} | {p['opacity']:.3f} "
                     f"| {p['visibility']:.1f} | {p['p99']:.1f} | {p['touched_fraction']:.0%} | "
                     f"{np.mean(p['scores']):.4f} | {p['missed_by']}/{len(runs)} |")

    # Why do normals score high? Their scores, their source photos, and what else they share with positives.
    for split in splits:
        attach_scores(replayed[split]["positive"] + replayed[split]["normal"], runs)
    val_recall = ""
    if "val" in replayed:
        val_recall = " Val positives at or above the val thresholds (chosen for recall 0.95): " + "/".join(
            f"{np.mean([p['scores'][k] >= run['threshold'] for p in replayed['val']['positive']]):.3f}"
            for k, run in enumerate(runs)) + "."
    lines += ["", "## Normals: why they score high", "",
              "Scores per split and class: quantiles are the mean over runs of each run's quantile; flagged: images "
              "at or above each run's val threshold (per run), and their mean share. Train images are scored "
              f"without augmentation.{val_recall}", "",
              "| split | class | images | p10 | p25 | median | p75 | p90 | max | flagged (per run) | share |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for split in splits:
        for label in ("normal", "positive"):
            lines.append(distribution_row(split, label, replayed[split][label], runs))
    lines += ["", "Per split, the source photos ranked by their normals' mean score (mean over runs; flagged and "
              "recall: share over images and runs at or above the val threshold), the positives made from the same "
              "photos, and the ROC AUC of those positives against the photo's own normals (mean over runs).", ""]
    sections, photo_tables = {}, {}
    for split in splits:
        section_lines, sections[split] = normals_section(split, replayed[split]["normal"],
                                                         replayed[split]["positive"], runs)
        photo_tables[split] = sections[split]["photos"]
        lines += section_lines + [""]
    sheets = write_sheets(args.sheets or args.out.with_suffix(""), replayed, runs, photo_files, photo_tables)
    lines.append("Contact sheets: " + ", ".join(str(path) for path in sheets))
    print("\n".join(lines))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    keys = ("layout", "opacity", "white", "match_error", "identical_encoded", "visibility", "mean_touched", "p99",
            "p99_touched", "touched_fraction", "scores", "missed_by")
    report = {"size": args.size, "replayed": len(positives), "matched": matched, "identical_encoded": identical,
              "runs": [{k: v for k, v in r.items() if k != "scores"} for r in runs],
              "by_layout": by_layout, "by_visibility_quartile": by_quartile, "quartile_edges": edges.tolist(),
              "separation_auc": measures, "removal": removal,
              "positives": [{"file": p["path"].name, **{k: p[k] for k in keys}} for p in positives],
              "normals": sections, "images": {
                  split: {label: [{"file": r["path"].name, **{k: r[k] for k in (
                      "photo", "width", "height", "aspect", "frac", "scale", "centre_x", "centre_y",
                      "identical_encoded", *PROPERTIES, "scores", "score", "flagged")}} for r in records]
                          for label, records in by_label.items()} for split, by_label in replayed.items()}}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
