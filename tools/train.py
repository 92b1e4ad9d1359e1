"""Train every task of a registry jointly on one shared model, then evaluate it.

    python tools/train.py [REGISTRY] [--work-dir DIR] [--epochs N] [--resume]
    torchrun --nproc-per-node 8 tools/train.py REGISTRY --launcher pytorch
"""

import argparse
import sys
from pathlib import Path

from waterdrop.config import ConfigError
from waterdrop.data.dataset import DataError
from waterdrop.engine.checkpoint import RunFolderError
from waterdrop.engine.train import run_training


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("registry", nargs="?", default="registry.yaml", help="registry YAML (default: registry.yaml)")
    parser.add_argument("--work-dir", help="run folder (default: work_dirs/<registry name>)")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--launcher", default="none", choices=["none", "pytorch", "slurm", "mpi"],
                        help="distributed launcher (pytorch under torchrun)")
    args = parser.parse_args()
    work_dir = args.work_dir or str(Path("work_dirs") / Path(args.registry).stem)
    try:
        report = run_training(args.registry, work_dir, args.epochs, args.resume, args.launcher)
    except (ConfigError, DataError, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report is not None:  # rank 0 only
        print(f"run folder: {work_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
