"""Evaluate a checkpoint: thresholds chosen on each task's val split, the report on its test split
(or on val, marked in-sample, without one): metrics JSON, thresholds, PR curves.
The chosen thresholds are also recorded in the checkpoint, where export reads them.

    python tools/eval.py CHECKPOINT_OR_RUN_FOLDER [--registry REGISTRY] [--out DIR]
"""

import argparse
import sys
from pathlib import Path

import torch

from waterdrop.engine.checkpoint import best_checkpoint, load_net, store_thresholds
from waterdrop.evaluation.evaluate import evaluate, format_report, thresholds_of


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .pth checkpoint, or a run folder (its best checkpoint)")
    parser.add_argument("--registry", help="take the tasks' data paths from this registry (same tasks, other data); "
                        "everything else comes from the config stored in the checkpoint")
    parser.add_argument("--out", help="output folder (default: <checkpoint folder>/eval)")
    parser.add_argument("--no-store", action="store_true",
                        help="do not record the chosen thresholds in the checkpoint (they are by default)")
    args = parser.parse_args()
    checkpoint = best_checkpoint(args.checkpoint)
    net, cfg, _ = load_net(checkpoint, args.registry)
    out = Path(args.out) if args.out else checkpoint.parent / "eval"
    report = evaluate(net, cfg, out, "cuda" if torch.cuda.is_available() else "cpu")
    if not args.no_store:
        store_thresholds(checkpoint, thresholds_of(report))
    print(format_report(report))
    print(f"metrics, thresholds and plots: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
