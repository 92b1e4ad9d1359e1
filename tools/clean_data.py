"""Clean image data before training: undecodable files, tiny images, uniform borders, duplicates.

    python tools/clean_data.py SOURCE [SOURCE ...] [--out DIR] [--min-pixels N] [--border-tolerance T | --no-trim]
                               [--near-distance D | --exact-only] [--sheet-pairs K] [--unlabelled]

SOURCE is a folder with one folder per label (``root/<label>/...``, searched recursively) or a
JSONL manifest, optionally named as NAME=PATH (default name: the folder's or file's name without
suffix). A folder whose images lie directly in it has no labels to read: it is refused, unless
--unlabelled says it is an unlabelled pool (its rows then carry no labels, never an empty list,
which a binary task reads as a negative). Give a task's splits in the order train val test: an
image found in two splits is dropped from the one given first, so val and test stay intact. DIR
(default: work_dirs/clean/<name>, or -2, -3, ... when that has files; <name> is the folder the
SOURCEs share, e.g. cats for data/cats/train data/cats/val, else the first SOURCE's name) receives
one cleaned manifest per SOURCE (NAME.jsonl, absolute image paths), trimmed copies, report.json
and duplicates.png; the input files are never changed. Imports no torch.

Exit codes: 0 done; 1 done, with undecodable images or bad manifest lines (counted in the table,
listed in report.json); 2 a bad argument (nothing written).

Loss-based outliers (needs the training install): with --outliers REGISTRY --task T, the
task is also trained briefly (--outlier-epochs, from the registry's weights) and the
training samples whose own label keeps a probability under --outlier-prob (averaged over
the epochs after the first) are listed for review in DIR/<task>_outliers.csv and <task>_outliers.png.
They are not dropped: a wrong label, an image the task cannot decide, or a rare case.

    python tools/clean_data.py --outliers registry.yaml --task disgusting [--out DIR]

(default DIR: work_dirs/clean/<task>).
"""

import sys
from pathlib import Path

from waterdrop import cli
from waterdrop.curation.cleaning import clean


def source(text: str) -> tuple[str, Path]:
    """NAME=PATH, or PATH named after its last part without suffix."""
    name, _, path = text.rpartition("=")
    if name and not Path(text).exists():
        return name, Path(path)
    return Path(text).stem, Path(text)


def default_name(sources: list[tuple[str, Path]]) -> str:
    """The output's name: the folder the splits share (data/cats/{train,val,test} -> cats),
    else the first source's name."""
    parents = {path.resolve().parent for _, path in sources}
    return parents.pop().name if len(parents) == 1 and len(sources) > 1 else sources[0][0]


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("sources", nargs="*", type=source, help="folders or .jsonl manifests, as PATH or NAME=PATH")
    parser.add_argument("--out", type=Path, help="output folder (default: work_dirs/clean/<shared folder's name>)")
    cli.add_overwrite(parser)
    parser.add_argument("--unlabelled", action="store_true",
                        help="folders are unlabelled pools (images directly inside; rows get no labels)")
    parser.add_argument("--min-pixels", type=int, default=3600,
                        help="smaller images (w x h after trimming) are dropped")
    parser.add_argument("--border-tolerance", type=int, default=8, help="grey levels a border line may vary by")
    parser.add_argument("--no-trim", action="store_true", help="keep borders (e.g. where the background is the label)")
    parser.add_argument("--near-distance", type=int, default=8, help="largest pHash bit distance of a near duplicate")
    parser.add_argument("--exact-only", action="store_true", help="look for exact duplicates only")
    parser.add_argument("--sheet-pairs", type=int, default=8, help="duplicate pairs drawn in duplicates.png")
    parser.add_argument("--outliers", metavar="REGISTRY", help="list loss-based outliers of --task in it")
    parser.add_argument("--task", help="the task of --outliers")
    parser.add_argument("--outlier-epochs", type=int, default=4, help="epochs of the short run")
    parser.add_argument("--outlier-prob", type=float, default=0.3,
                        help="listed when the label's probability stays under this")
    args = cli.start(parser.parse_args())
    if not args.sources and not args.outliers:
        parser.error("give SOURCEs to clean, or --outliers REGISTRY --task T, or both")
    if bool(args.outliers) != bool(args.task):
        parser.error("--outliers and --task go together")
    try:
        cli.check_exists([path for _, path in args.sources], "source")
        name = default_name(args.sources) if args.sources else args.task
        args.out = cli.output_path(args.out, Path("work_dirs") / "clean" / name, args.overwrite)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    status = clean_sources(args) if args.sources else cli.EXIT_OK
    if status == cli.EXIT_USAGE or not args.outliers:
        return status
    return max(status, list_outliers(args))


def clean_sources(args) -> int:
    try:
        report = clean(
            args.sources,
            args.out,
            min_pixels=args.min_pixels,
            border_tolerance=None if args.no_trim else args.border_tolerance,
            near_distance=None if args.exact_only else args.near_distance,
            sheet_pairs=args.sheet_pairs,
            unlabelled=args.unlabelled,
        )
    except (ValueError, OSError) as err:  # a bad source or name, an unwritable DIR
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    print(report.summary())
    failed = sum(counts.get("undecodable", 0) + counts.get("bad_line", 0) for counts in report.splits.values())
    return cli.EXIT_PARTIAL if failed else cli.EXIT_OK


def list_outliers(args) -> int:
    import torch  # the outlier run trains; cleaning alone stays torch-free

    from waterdrop.config import ConfigError, load_registry
    from waterdrop.curation.outliers import label_outliers, short_run, write_outliers
    from waterdrop.curation.sample_losses import record_sample_losses
    from waterdrop.model.multitask import MultiTaskNet
    from waterdrop.records import DataError

    try:
        cfg = load_registry(args.outliers)
        torch.manual_seed(cfg.train.seed)
        recorded = record_sample_losses(MultiTaskNet(cfg), cfg, args.task, short_run(args.outlier_epochs, cfg.train.lr),
                                        "cuda" if torch.cuda.is_available() else "cpu")
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    found = label_outliers(recorded, args.outlier_prob)
    files = write_outliers(recorded, found, args.out, args.task)
    print(f"{len(found)} of {recorded.losses.shape[1]} training images of {args.task} keep their label's probability "
          f"under {args.outlier_prob} on average after epoch 1 (review, not dropped): {files['outliers']}")
    if recorded.undecodable:
        print(f"{len(recorded.undecodable)} undecodable image(s) left out")
        return cli.EXIT_PARTIAL
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
