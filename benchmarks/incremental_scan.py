"""An incremental scan against a full rescan, on real photographs (CPU).

    python benchmarks/real_photos.py && python benchmarks/retrieval.py   # photographs, and an exported model
    python benchmarks/incremental_scan.py [--new 0.05] [--out work_dirs/incremental_scan]

Yesterday's pool: 95 % of the suite's photographs (a path list), scanned whole. Today's: all of
them, so 5 % is new. Rows: today's pool scanned whole, and scanned ``--since`` yesterday's scan
(the local engine, default workers and threads, each run three times, alternated).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, machine  # noqa: E402

from waterdrop.scan import scan_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=float, default=0.05)
    parser.add_argument("--model", type=Path, default=REPO / "work_dirs/retrieval/heldout_collage/model.onnx")
    parser.add_argument("--out", type=Path, default=REPO / "work_dirs/incremental_scan")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    photos = sorted(str(p) for p in (REPO / "work_dirs/real_photos").glob("*/*/*/*.jpg"))
    rng = np.random.default_rng(0)
    new = set(rng.choice(photos, round(args.new * len(photos)), replace=False).tolist())
    (args.out / "yesterday.txt").write_text("".join(f"{p}\n" for p in photos if p not in new))
    (args.out / "today.txt").write_text("".join(f"{p}\n" for p in photos))
    shutil.rmtree(args.out / "yesterday", ignore_errors=True)
    scan_local(args.model, args.out / "yesterday.txt", args.out / "yesterday", progress=False)
    runs: dict[str, list[dict]] = {"full rescan": [], "--since yesterday": []}
    for _ in range(3):
        for label, since in (("full rescan", None), ("--since yesterday", [args.out / "yesterday"])):
            shutil.rmtree(args.out / "today", ignore_errors=True)
            record = scan_local(args.model, args.out / "today.txt", args.out / "today", since=since, progress=False)
            runs[label].append(record["this_run"])
    result = {"machine": machine(), "photos": len(photos), "new": len(new), "runs": runs}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    for label, records in runs.items():
        print(label, [r["seconds"] for r in records], records[-1].get("skipped_as_scored_before"),
              records[-1]["seen"])


if __name__ == "__main__":
    main()
