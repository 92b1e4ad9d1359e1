"""Compare a candidate model with the one in production, task by task, and gate the release.

    python tools/compare.py DEPLOYED CANDIDATE [--registry R] [--pool SOURCE ... --pool-size N]
        [--out DIR] [--force] [--bootstrap 1000] [--seed 0]

DEPLOYED and CANDIDATE are exported ONNX files, or run folders holding one (model.onnx). Every
task in both is scored on its test split (val where it has none, said in the report) with both
models on the same images: the headline metric of each and a paired bootstrap 95% interval of
the change, precision and recall at each model's own thresholds (on the split and at the
deploy prevalence), negative flips (right before, wrong now) with a contact sheet, positive
flips, threshold drift, per label for multi-label tasks, grade changes for graded ones. A task
whose content hash is the same in both files is reported unchanged without scoring. --pool: how
many of a sample of unlabeled images change decision per task. Tasks in one model only are
listed as added or retired.

The data comes from --registry, else the candidate's run (its config/resolved.json), else the
deployed model's run. Torch-free: the runtime install and matplotlib.

The gate, per task, from the candidate's task YAML (deploy section):
max_metric_drop (default 0.01; over budget when the whole 95% interval of the change lies below
minus it) and max_negative_flip_rate (default 0.02).

Writes compare.json, compare.md, pr_curves.png and <task>_negative_flips.png into --out
(default: <candidate run folder>/compare, or work_dirs/compare/<candidate name>).

Exit codes: 0 the gate passed (or --force, recorded in compare.json); 1 a task is over its
budget (the report is written and names it); 2 a bad argument (nothing written).
"""

import sys
from pathlib import Path

from waterdrop import cli
from waterdrop.config import ConfigError
from waterdrop.records import DataError
from waterdrop.release.compare import BOOTSTRAP_ROUNDS, Model, compare
from waterdrop.release.report import write_report
from waterdrop.runtime import Predictor
from waterdrop.scoring import load_config


def model_file(given: str) -> Path:
    """The ONNX file of a file or run folder argument."""
    path = Path(given)
    cli.check_exists([path], "model file or run folder")
    if path.is_dir():
        if not (path / "model.onnx").is_file():
            raise cli.UsageError(f"{path}: no model.onnx in this run folder; export it first (tools/export.py {path})")
        path = path / "model.onnx"
    return cli.check_onnx_file(path)


def data_config(registry: str | None, models: list[Path]):
    """The config whose tasks' splits the comparison scores on."""
    if registry:
        cli.check_registry(registry)
        return load_config(registry)
    for model in models:
        resolved = model.parent / "config" / "resolved.json"
        if resolved.is_file():
            return load_config(resolved)
    raise cli.UsageError("no data to compare on: neither model sits in a run folder with config/resolved.json; "
                         "give --registry")


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("deployed", help="the model in production: ONNX file or run folder")
    parser.add_argument("candidate", help="the new model: ONNX file or run folder")
    parser.add_argument("--registry", help="the registry whose tasks' splits are scored")
    parser.add_argument("--pool", nargs="+", help="unlabeled images (folders, manifests, files) to count decision "
                        "changes on")
    parser.add_argument("--pool-size", type=int, default=2000, help="images sampled from --pool")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_ROUNDS, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the pool sample")
    parser.add_argument("--force", action="store_true", help="exit 0 even when a task is over budget (recorded)")
    parser.add_argument("--out", help="output folder")
    cli.add_overwrite(parser)
    args = cli.start(parser.parse_args())
    try:
        old_path, new_path = model_file(args.deployed), model_file(args.candidate)
        if args.pool:
            cli.check_exists(args.pool, "pool source")
        if args.pool_size < 1 or args.bootstrap < 1:
            raise cli.UsageError("--pool-size and --bootstrap must be at least 1")
        cfg = data_config(args.registry, [new_path, old_path])
        in_run = (new_path.parent / "config").is_dir()
        default = new_path.parent / "compare" if in_run else Path("work_dirs") / "compare" / new_path.stem
        out = cli.output_path(args.out, default, args.overwrite)
        old, new = Model(old_path, Predictor(old_path)), Model(new_path, Predictor(new_path))
        record, arrays = compare(old, new, cfg, args.bootstrap, args.seed, [Path(p) for p in args.pool or []],
                                 args.pool_size)
    except (ConfigError, DataError, ValueError, cli.UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    record["forced"] = bool(args.force and record["over_budget"])
    written = write_report(record, arrays, out)
    print(written["markdown"].read_text())
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    if record["over_budget"] and not args.force:
        print(f"gate: over budget: {', '.join(record['over_budget'])} (see {written['markdown']}; --force overrides)",
              file=sys.stderr)
        return cli.EXIT_PARTIAL
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
