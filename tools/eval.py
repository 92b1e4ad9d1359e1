"""Evaluate a checkpoint: thresholds chosen on each task's val split, the report on its test split
(or on val, marked in-sample, without one): metrics JSON, thresholds, PR curves.

    python tools/eval.py CHECKPOINT_OR_RUN_FOLDER [--registry REGISTRY] [--out DIR] [--overwrite] [--quiet]

Writes into --out, by default <run folder>/eval (training already wrote one there; a second
evaluation goes to eval-2, eval-3, ...). The checkpoint is never changed: tools/export.py
reads the thresholds from <run folder>/eval/thresholds.json, or from --thresholds.

Exit codes: 0 done; 1 done, with undecodable images left out (listed in metrics.json); 2 a
bad argument or config (nothing written).
"""

import sys

import torch

from waterdrop import cli
from waterdrop.config import ConfigError
from waterdrop.engine.checkpoint import RunFolderError, best_checkpoint, load_net
from waterdrop.evaluation.evaluate import evaluate, format_report
from waterdrop.records import DataError


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("checkpoint", help="a .pth checkpoint, or a run folder (its kept checkpoint, train.checkpoint)")
    parser.add_argument("--registry", help="take the tasks' data paths from this registry (same tasks, other data); "
                        "everything else comes from the config stored in the checkpoint")
    parser.add_argument("--out", help="output folder (default: <run folder>/eval, or eval-2, ... when it has files)")
    cli.add_overwrite(parser)
    args = cli.start(parser.parse_args())
    try:
        checkpoint = best_checkpoint(cli.check_run(args.checkpoint))
        if args.registry:
            cli.check_registry(args.registry)
        net, cfg, _ = load_net(checkpoint, args.registry)
        out = cli.output_path(args.out, checkpoint.parent / "eval", args.overwrite)
        report = evaluate(net, cfg, out, "cuda" if torch.cuda.is_available() else "cpu", checkpoint)
    except (ConfigError, DataError, RunFolderError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    print(format_report(report))
    print(f"metrics, thresholds and plots: {out}")
    if out != checkpoint.parent / "eval":
        print(f"to export with these thresholds: tools/export.py {args.checkpoint} "
              f"--thresholds {out / 'thresholds.json'}")
    skipped = sum(len(r["skipped_images"]) for r in report.values())
    if skipped:
        print(f"{skipped} image(s) could not be decoded and were left out (listed in metrics.json)", file=sys.stderr)
        return cli.EXIT_PARTIAL
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
