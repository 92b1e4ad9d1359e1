"""Choose which images to label next (active learning), or which labeled ones to re-check.

    python tools/select_for_labeling.py MODEL_OR_RUN POOL --budget N [--task T] [--out DIR]
        [--strategy auto|band|loss|union] [--low L --high H] [--threshold T]

MODEL_OR_RUN is an exported .onnx file (scored with the torch-free runtime) or a checkpoint /
run folder (scored with PyTorch, no export needed). POOL is a folder of unlabeled images or a
JSONL manifest of labeled ones ({"image", "labels"} lines, as in tasks), for recalls.

Strategies (see waterdrop/curation/selection.py): ``band``, the images whose probability lies
in the uncertain band around the task's threshold, closest first (on a labeled manifest: the
positives scored below --low and the negatives above --high); ``loss``, the highest loss
predicted by the task's loss prediction module (``loss_prediction`` in the task YAML);
``union``, both interleaved. ``auto`` (default): the union when the model predicts losses,
else the band.

Writes into --out (default: selection/<task>): one CSV per ranking (band.csv or hard.csv,
predicted_loss.csv), selected.csv (the union at the budget), undecodable.txt and summary.json.
"""

import argparse
import sys
from pathlib import Path

from waterdrop.curation.pool_scores import open_model, read_pool, score_pool
from waterdrop.curation.selection import STRATEGIES, plan, select, write_selection


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an exported .onnx file, or a checkpoint or run folder")
    parser.add_argument("pool", help="a folder of unlabeled images, or a .jsonl manifest of labeled ones")
    parser.add_argument("--budget", type=int, required=True, help="how many images to select")
    parser.add_argument("--task", help="the task to select for (needed when the model has several)")
    parser.add_argument("--out", help="output folder (default: selection/<task>)")
    parser.add_argument("--strategy", default="auto", choices=STRATEGIES)
    parser.add_argument(
        "--low", type=float, help="lower end of the uncertain band (default: odds 3x below the threshold's)"
    )
    parser.add_argument("--high", type=float, help="upper end of the band (default: odds 3x above the threshold's)")
    parser.add_argument("--threshold", type=float, help="replaces the model's decision threshold(s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4, help="image-decoding threads")
    args = parser.parse_args()
    try:
        scorer = open_model(args.model, args.task)
        plan(scorer.task, args.budget, args.strategy, args.threshold, args.low, args.high)  # before scoring
        paths, truth = read_pool(args.pool, scorer.task)
        scores = score_pool(scorer, paths, truth, args.batch_size, args.workers)
        selection = select(scores, scorer.task, args.budget, args.strategy, args.low, args.high, args.threshold)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("selection") / scorer.task.name
    summary = write_selection(out, scores, scorer.task, selection, str(args.pool))
    print(
        f"{scorer.task.name}: scored {summary['scored']} images of {args.pool}"
        + (f"; {summary['undecodable']} undecodable (listed in undecodable.txt)" if summary["undecodable"] else "")
    )
    for name, count in summary["rankings"].items():
        print(f"  {name}: {count} images ranked")
    print(f"selected {summary['selected']} of the budget {args.budget}: {out / 'selected.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
