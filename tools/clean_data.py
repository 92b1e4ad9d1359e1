"""Clean image data before training: undecodable files, tiny images, uniform borders, duplicates.

    python tools/clean_data.py SOURCE [SOURCE ...] --out DIR [--min-pixels N] [--border-tolerance T | --no-trim]
                               [--near-distance D | --exact-only] [--sheet-pairs K]

SOURCE is a folder of images (searched recursively; ``root/<label>/...`` gives the label) or a
JSONL manifest, optionally named as NAME=PATH (default name: the folder's or file's name without
suffix). Give a task's splits in the order train val test: an image found in two splits is
dropped from the one given first, so val and test stay intact. DIR receives one cleaned manifest
per SOURCE (NAME.jsonl, absolute image paths), trimmed copies, report.json and duplicates.png;
the input files are never changed. Imports no torch.
"""

import argparse
import sys
from pathlib import Path

from waterdrop.curation.cleaning import clean


def source(text: str) -> tuple[str, Path]:
    """NAME=PATH, or PATH named after its last part without suffix."""
    name, _, path = text.rpartition("=")
    if name and not Path(text).exists():
        return name, Path(path)
    return Path(text).stem, Path(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=source, help="folders or .jsonl manifests, as PATH or NAME=PATH")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--min-pixels", type=int, default=3600, help="smaller images (w x h after trimming) are dropped"
    )
    parser.add_argument("--border-tolerance", type=int, default=8, help="grey levels a border line may vary by")
    parser.add_argument("--no-trim", action="store_true", help="keep borders (e.g. where the background is the label)")
    parser.add_argument("--near-distance", type=int, default=8, help="largest pHash bit distance of a near duplicate")
    parser.add_argument("--exact-only", action="store_true", help="look for exact duplicates only")
    parser.add_argument("--sheet-pairs", type=int, default=8, help="duplicate pairs drawn in duplicates.png")
    args = parser.parse_args()
    try:
        report = clean(
            args.sources,
            args.out,
            min_pixels=args.min_pixels,
            border_tolerance=None if args.no_trim else args.border_tolerance,
            near_distance=None if args.exact_only else args.near_distance,
            sheet_pairs=args.sheet_pairs,
        )
    except (ValueError, OSError) as err:  # a bad source or name, an unwritable DIR
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
