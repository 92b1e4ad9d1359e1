"""Choose which images to label next (active learning), or which labeled ones to re-check.

    python tools/select_for_labeling.py MODEL_OR_RUN POOL --budget N [--task T] [--out DIR]
        [--strategy auto|band|loss|union] [--low L --high H] [--threshold T] [--quiet]

MODEL_OR_RUN is an exported .onnx file (scored with the torch-free runtime) or a checkpoint /
run folder (scored with PyTorch, no export needed). POOL is a folder of unlabeled images or a
JSONL manifest of labeled ones ({"image", "labels"} lines, as in tasks), for recalls.

Strategies (see waterdrop/curation/selection.py): ``band``, the images whose probability lies
in the uncertain band around the task's threshold, closest first (on a labeled manifest: the
positives scored below --low and the negatives above --high); ``loss``, the highest loss
predicted by the task's loss prediction module (``loss_prediction`` in the task YAML);
``union``, both interleaved. ``auto`` (default): the union when the model predicts losses,
else the band. When the default band holds fewer images than the budget it is widened in the
same order (next closest to the threshold) until the budget is filled; a band given with
--low/--high is kept, and the tool says why fewer were selected.

Writes into --out (default: <run folder>/selection/<task>, the run folder being MODEL's own
folder; -2, -3, ... when it has files): one CSV per ranking (band.csv or hard.csv,
predicted_loss.csv), selected.csv (the union at the budget: prob, the threshold, the log-odds
distance between them, in_band, predicted_loss), undecodable.txt and summary.json.

Exit codes: 0 done; 1 done, with undecodable images left out (listed in undecodable.txt);
2 a bad argument or a strategy the model cannot serve (nothing written).
"""

import sys
from pathlib import Path

from waterdrop import cli
from waterdrop.curation.pool_scores import open_model, read_pool, score_pool
from waterdrop.curation.selection import STRATEGIES, select, selection_plan, write_selection


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("model", help="an exported .onnx file, or a checkpoint or run folder")
    parser.add_argument("pool", help="a folder of unlabeled images, or a .jsonl manifest of labeled ones")
    parser.add_argument("--budget", type=int, required=True, help="how many images to select")
    parser.add_argument("--task", help="the task to select for (needed when the model has several)")
    parser.add_argument("--out", help="output folder (default: <run folder>/selection/<task>)")
    cli.add_overwrite(parser)
    parser.add_argument("--strategy", default="auto", choices=STRATEGIES, help="see above")
    parser.add_argument(
        "--low", type=float, help="lower end of the uncertain band (default: odds 3x below the threshold's)"
    )
    parser.add_argument("--high", type=float, help="upper end of the band (default: odds 3x above the threshold's)")
    parser.add_argument("--threshold", type=float, help="replaces the model's decision threshold(s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model run")
    parser.add_argument("--workers", type=int, default=4, help="image-decoding threads")
    args = cli.start(parser.parse_args())
    try:
        cli.check_exists([args.model], "model, checkpoint or run folder")
        cli.check_exists([args.pool], "pool")
        if Path(args.model).suffix.lower() != ".onnx":
            cli.check_run(args.model)
        scorer = open_model(args.model, args.task)
        selection_plan(scorer.task, args.budget, args.strategy, args.threshold, args.low, args.high)  # before scoring
        out = cli.output_path(args.out, cli.run_folder(args.model) / "selection" / scorer.task.name, args.overwrite)
        paths, truth = read_pool(args.pool, scorer.task)
        scores = score_pool(scorer, paths, truth, args.batch_size, args.workers)
        selection = select(scores, scorer.task, args.budget, args.strategy, args.low, args.high, args.threshold)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    summary = write_selection(out, scores, scorer.task, selection, str(args.pool))
    print(
        f"{scorer.task.name}: scored {summary['scored']} images of {args.pool}"
        + (f"; {summary['undecodable']} undecodable (listed in undecodable.txt)" if summary["undecodable"] else "")
    )
    for name, count in summary["rankings"].items():
        print(f"  {name}: {count} images ranked")
    for note in selection.notes:
        print(f"  note: {note}")
    print(f"selected {summary['selected']} of the budget {args.budget}: {out / 'selected.csv'}")
    return cli.EXIT_PARTIAL if summary["undecodable"] else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
