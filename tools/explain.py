"""Grad-CAM overlays: where each task of a trained model looks in the given images.

    python tools/explain.py RUN IMAGE [IMAGE ...] [--task T] [--label L] [--stage 1|2] [--level I]
                            [--out DIR] [--batch-size N] [--device cpu|cuda] [--quiet]

RUN is a run folder (its kept checkpoint) or a checkpoint file; IMAGE are image files or
folders (searched recursively). Into DIR (default: <run folder>/explain; -2, -3, ... when it
has files) it writes

* ``<image stem>.<task>[.<label>][.stage2].png``: the map blended into the image (red = the
  regions that raise the score most). An image whose stem an earlier image already had
  (same name in another folder) is written as ``<stem>-2``, ``<stem>-3`` ...;
* ``index.json`` and ``index.csv``: one row per overlay: image, task, stage, target, score, file.

What is explained, per task (every task unless --task):

* binary: the decision, score = positive minus normal logit (P(positive) is its sigmoid), and
  one map per sub-class (score = its logit); ``--label NAME`` that sub-class alone;
* multi-label: one map per tag, score = the tag's logit (before fusion with a detector: a tag
  that the detector's boxes decide is better seen in the boxes); ``--label NAME`` one tag;
* graded: the score s(x) (P(grade above k) = sigmoid(s(x) + b_k)).

``target`` is the label explained, empty for a binary decision or a graded score. A cascade
task is explained at stage 1 and at stage 2 (its second network), or at --stage alone.
--level picks the feature level (0 = stem ... -1 = deepest, the default; shallower levels give
finer but less specific maps).

An image that cannot be decoded is named on stderr and counted; the run goes on. Exit codes:
0 every image explained; 1 some (or all) could not be decoded; 2 a bad argument (an unknown
task or label: the message names the known ones; a missing image path), nothing written.
"""

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from waterdrop import cli
from waterdrop.engine.checkpoint import best_checkpoint, load_net
from waterdrop.explain import check_level, explained_parts, grad_cams, resolve_targets, stage_count
from waterdrop.imageio import ImageDecodeError, decoded_images, to_model_input
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.overlay import UniqueStems, overlay, overlay_name, write_png
from waterdrop.progress import Progress

COLUMNS = ["image", "task", "stage", "target", "score", "file"]


def plan(net: MultiTaskNet, task: str | None, label: str | None, stage: int | None,
         level: int) -> list[tuple[str, int, list[str | None]]]:
    """(task, stage, targets) of the maps to draw per image; raises ValueError for a bad choice."""
    if label not in (None, "all") and task is None:
        raise ValueError(f"--label {label} needs --task (labels belong to one task)")
    jobs = []
    for name in [task] if task else net.task_names:
        _, head, _ = explained_parts(net, name)
        if stage is None:
            stages = list(range(1, stage_count(net, name) + 1))
        elif stage > 1 and task is None and stage_count(net, name) < stage:
            continue  # --stage 2 over every task: the tasks with a second network alone
        else:
            stages = [stage]
        for each in stages:
            trunk, _, _ = explained_parts(net, name, each)  # refuses a stage the task does not have
            check_level(trunk, level)
            jobs.append((name, each, resolve_targets(head, label)))
    if not jobs:
        raise ValueError(f"no task has a stage {stage} (a cascade's second network) to explain")
    return jobs


def decoded_batches(given: list[str], batch_size: int, skipped: list[str]) -> Iterator[list[tuple[Path, np.ndarray]]]:
    """Batches of (path, RGB image), in order; a file that cannot be decoded is named on stderr
    and added to ``skipped``."""
    batch = []
    for path, image in decoded_images(given):
        if isinstance(image, ImageDecodeError):
            print(f"skipped: {image}", file=sys.stderr)
            skipped.append(str(path))
            continue
        batch.append((path, image))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def explain_images(net: MultiTaskNet, jobs: list, level: int, paths: list[Path], images: list[np.ndarray],
                   stems: list[str], out: Path, size: int, device: torch.device) -> list[dict]:
    """Write the overlays of one batch; returns their index rows."""
    batch = torch.from_numpy(to_model_input(images, size)).to(device)
    rows = []
    for task, stage, targets in jobs:
        for target, (maps, scores) in zip(targets, grad_cams(net, batch, task, targets, stage, level)):
            for path, image, stem, cam, score in zip(paths, images, stems, maps.cpu().numpy(), scores.tolist()):
                name = overlay_name(stem, task, target, stage2=stage == 2)
                write_png(out / name, overlay(image, cam))
                rows.append({"image": str(path), "task": task, "stage": stage, "target": target,
                             "score": round(score, 6), "file": name})
    return rows


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("run", help="a run folder (its kept checkpoint) or a .pth checkpoint")
    parser.add_argument("images", nargs="+", help="images or folders")
    parser.add_argument("--task", help="explain this task only (default: every task)")
    parser.add_argument("--label", help="only this sub-class of a binary task or tag of a multi-label task (needs "
                        "--task); default (or 'all'): every target")
    parser.add_argument("--stage", type=int, choices=[1, 2], help="1, or 2 for a cascade's second network "
                        "(default: both for cascade tasks)")
    parser.add_argument("--level", type=int, default=-1, help="feature level whose map is weighted (default -1, the "
                        "deepest)")
    parser.add_argument("--out", help="output folder (default: <run folder>/explain)")
    cli.add_overwrite(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the network runs")
    args = cli.start(parser.parse_args())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device here", file=sys.stderr)
        return cli.EXIT_USAGE
    try:
        checkpoint = best_checkpoint(cli.check_run(args.run))
        cli.check_exists(args.images, "image or folder")
        net, cfg, _ = load_net(checkpoint)
        jobs = plan(net, args.task, args.label, args.stage, args.level)
        out = cli.output_path(args.out, checkpoint.parent / "explain", args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    device = torch.device(args.device)
    net.to(device)
    out.mkdir(parents=True, exist_ok=True)
    stems, skipped, rows, explained = UniqueStems(), [], [], 0
    with Progress("explain") as meter:
        for batch in decoded_batches(args.images, args.batch_size, skipped):
            paths, images = (list(column) for column in zip(*batch))
            rows += explain_images(net, jobs, args.level, paths, images, [stems(p) for p in paths], out,
                                   cfg.model.input_size, device)
            explained += len(paths)
            meter.update(len(paths))
    (out / "index.json").write_text(json.dumps(rows, indent=1))
    with open(out / "index.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{explained} image(s) explained: {len(rows)} overlays in {out}")
    if skipped:
        print(f"{len(skipped)} image(s) could not be decoded", file=sys.stderr)
    return cli.EXIT_PARTIAL if skipped or not explained else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
