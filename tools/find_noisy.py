"""Rank one task's training labels by how likely they are wrong (O2U-Net), for a person to
re-check the top of the list. Nothing of the task's data is modified.

    python tools/find_noisy.py REGISTRY --task T [--from RUN_OR_CHECKPOINT] [--out DIR]
        [--normal-epochs N] [--cycles C] [--cycle-epochs E] [--lr-max LR] [--lr-min LR]
        [--top K] [--drop FRACTION] [--quiet]

Without --from the network starts from the registry's weights and trains --normal-epochs
(default 2) before the cycles; with --from it starts from that run's kept checkpoint (the
task's data paths still come from REGISTRY) and the normal phase defaults to 0. --cycles
must be at least 2: the restarts of the learning rate are what set noisy samples apart.
Writes into DIR (default: <run folder>/noisy/<task> with --from, else
work_dirs/noisy/<task>; -2, -3, ... when it has files) <task>_ranking.csv (most suspicious
first; a column that is the same for every row, such as final_normal_loss without a normal
phase, is left out), <task>_top<K>.png (a contact sheet of the first K with their labels),
<task>_summary.json and, with --drop, a manifest of the training split without the top
FRACTION (<task>_cleaned_train.jsonl) to train on.

Exit codes: 0 done; 1 done, with undecodable training images left out (listed in the
summary); 2 a bad argument or config (nothing written).
"""

import json
import sys
from pathlib import Path

import torch

from waterdrop import cli
from waterdrop.config import ConfigError, load_registry
from waterdrop.curation.noisy import O2USettings, rank, write_outputs
from waterdrop.curation.sample_losses import record_sample_losses
from waterdrop.engine.checkpoint import RunFolderError, best_checkpoint, load_net
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.records import DataError


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("registry", help="registry YAML whose task is ranked")
    parser.add_argument("--task", required=True, help="the task whose training labels are ranked")
    parser.add_argument("--from", dest="start", help="start from this run folder or checkpoint")
    parser.add_argument("--out", help="output folder (default: <run>/noisy/<task>, or work_dirs/noisy/<task>)")
    cli.add_overwrite(parser)
    parser.add_argument("--normal-epochs", type=int, help="plain epochs first (default: 2, or 0 with --from)")
    parser.add_argument("--cycles", type=int, default=3, help="learning-rate cycles recorded (at least 2)")
    parser.add_argument("--cycle-epochs", type=int, default=2, help="epochs per cycle")
    parser.add_argument("--lr-max", type=float, help="top of each cycle (default: the registry's lr)")
    parser.add_argument("--lr-min", type=float, help="bottom of each cycle (default: lr-max / 100)")
    parser.add_argument("--top", type=int, default=64, help="images on the contact sheet")
    parser.add_argument("--drop", type=float, default=0.0,
                        help="also write a training manifest without this top fraction (e.g. 0.05; 0: none)")
    args = cli.start(parser.parse_args())
    if not 0 <= args.drop < 1:
        parser.error("--drop must be a fraction in [0, 1)")
    normal = args.normal_epochs if args.normal_epochs is not None else (0 if args.start else 2)
    settings = O2USettings(normal, args.cycles, args.cycle_epochs, args.lr_max, args.lr_min)
    try:
        cli.check_registry(args.registry)
        settings.phases(1.0)  # refuses meaningless settings before anything is loaded
        base = cli.run_folder(cli.check_run(args.start)) if args.start else Path("work_dirs")
        out = cli.output_path(args.out, base / "noisy" / args.task, args.overwrite)
        if args.start:
            net, cfg, _ = load_net(best_checkpoint(args.start), args.registry)
        else:
            cfg = load_registry(args.registry)
            torch.manual_seed(cfg.train.seed)  # the new heads' initialisation, as training does
            net = MultiTaskNet(cfg)
        phases = settings.phases(cfg.train.lr)
        recorded = record_sample_losses(net, cfg, args.task, phases, "cuda" if torch.cuda.is_available() else "cpu")
    except (ConfigError, DataError, RunFolderError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    ranking = rank(recorded)
    files = write_outputs(ranking, out, args.task, args.top, args.drop)
    if recorded.undecodable:
        print(f"{len(recorded.undecodable)} undecodable image(s) left out; listed in {files['summary']}")
    print(f"ranked {len(ranking.order)} training images of {args.task}; most suspicious first:")
    for position, i in enumerate(ranking.order[:10], 1):
        record = ranking.records[i]
        print(f"  {position:3d}. score {ranking.score[i]:+.3f}  {','.join(record.labels) or '(none)':20s} "
              f"{record.path}")
    left_out = json.loads(files["summary"].read_text())["columns_left_out"]
    if left_out:
        print(f"left out of the ranking, the same for every image here: {', '.join(left_out)}")
    for name, path in files.items():
        print(f"{name}: {path}")
    return cli.EXIT_PARTIAL if recorded.undecodable else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
