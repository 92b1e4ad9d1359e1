"""Train every task of a registry jointly on one shared model, then evaluate it; or train some
tasks of a trained model and keep the others exactly as they are.

    python tools/train.py [REGISTRY] [--work-dir DIR] [--epochs N] [--resume] [--quiet]
    python tools/train.py REGISTRY --from RUN [--tasks TASK ...] [--retire TASK ...] --work-dir DIR
    torchrun --nproc-per-node 8 tools/train.py REGISTRY --launcher pytorch

--from RUN (the run folder or checkpoint of the model in production): the registry is the new
model's task list. A task in both and not named in --tasks is carried over unchanged (weights,
BatchNorm statistics, head, thresholds); one named is retrained; one in the registry alone is
added; one in RUN alone must be named in --retire. The shared trunk is frozen, so only the
trained tasks' own BatchNorm copies, heads and features learn. lineage.json records every
task's content hash, whether it changed, and how far the carried tasks' outputs moved from
RUN's (0: bit for bit).

The run folder (default: work_dirs/<registry name>) must hold no other run's checkpoints:
a second run needs another --work-dir, or --resume to continue the one there. Progress: a
line every train.log_interval iterations (epoch, each loss term, lr, images/s, time left,
memory), a validation line per epoch, a progress line while the kept checkpoint is
evaluated; --quiet keeps only the validation lines and the final report. The last line says
where the wall time went (start-up, training, validation, checkpoints, final evaluation), and
timing.json keeps it.

Exit codes: 0 trained and evaluated; 1 the same, with undecodable images skipped (counted,
listed in summary.json and eval/metrics.json); 2 a bad registry, data or run folder (the
message says which file and key), before training starts.
"""

import time

STARTED = time.time()  # before the imports below: loading torch is part of a run's start-up

import json
import os
import sys
from pathlib import Path

from waterdrop import cli
from waterdrop.config import ConfigError, load_registry
from waterdrop.data.demo import ensure_demo_data
from waterdrop.engine.checkpoint import RunFolderError
from waterdrop.engine.lifecycle import PlanError
from waterdrop.engine.train import run_training
from waterdrop.records import DataError

# Where each launcher puts this process's rank; the process group, which knows it too, starts later.
RANK_VARIABLES = {"pytorch": "RANK", "slurm": "SLURM_PROCID", "mpi": "OMPI_COMM_WORLD_RANK"}


def prepare_demo_data(registry: str, launcher: str) -> None:
    """Generate the registry's demo data on first use, on rank 0 alone (``run_training`` holds
    the other ranks until every rank has arrived)."""
    folder = load_registry(registry).demo_data
    variable = RANK_VARIABLES.get(launcher)
    rank = int(os.environ.get(variable, "0")) if variable else 0
    if folder is not None and rank == 0 and ensure_demo_data(folder):
        print(f"generated the demo data in {folder}")


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("registry", nargs="?", default="registry.yaml", help="registry YAML (default: registry.yaml)")
    parser.add_argument("--work-dir", help="run folder (default: work_dirs/<registry name>)")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--from", dest="parent", metavar="RUN",
                        help="train on this trained model (run folder or checkpoint): only --tasks and the tasks it "
                             "lacks learn, the rest is frozen")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="with --from: the tasks to train (default: the registry's tasks RUN lacks)")
    parser.add_argument("--retire", nargs="+", default=[], metavar="TASK",
                        help="with --from: tasks of RUN the registry leaves out on purpose")
    parser.add_argument("--launcher", default="none", choices=["none", "pytorch", "slurm", "mpi"],
                        help="distributed launcher (pytorch under torchrun)")
    args = cli.start(parser.parse_args())
    work_dir = args.work_dir or str(Path("work_dirs") / Path(args.registry).stem)
    try:
        cli.check_registry(args.registry)
        if args.parent:
            cli.check_run(args.parent)
        prepare_demo_data(args.registry, args.launcher)
        report = run_training(args.registry, work_dir, args.epochs, args.resume, args.launcher, parent=args.parent,
                              tasks=args.tasks, retire=args.retire, started=STARTED)
    except (ConfigError, DataError, PlanError, RunFolderError, cli.UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    if report is None:  # ranks other than 0
        return cli.EXIT_OK
    print(f"run folder: {work_dir}")
    summary = json.loads((Path(work_dir) / "summary.json").read_text())
    skipped = summary["skipped_image_count"] + sum(len(r["skipped_images"]) for r in report.values())
    if skipped:
        print(f"{skipped} image(s) could not be decoded and were skipped (listed in summary.json and "
              "eval/metrics.json)", file=sys.stderr)
        return cli.EXIT_PARTIAL
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
