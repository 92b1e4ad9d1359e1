"""Release a candidate model into a versioned Triton model repository, behind the release gate.

    python tools/release.py CANDIDATE --repository DIR --name NAME [--deployed MODEL]
        [--registry R] [--pool SOURCE ...] [--force] [--max-batch-size 32]

CANDIDATE is an exported ONNX file or a run folder holding model.onnx. It is compared with the
deployed model (--deployed, else the repository's latest version of NAME; the first version is
released without a comparison) exactly as tools/compare.py does, and released only when every
task is within its budget (--force releases anyway and says so in the model card). A release is
a new version folder:

    DIR/NAME/config.pbtxt              Triton: onnxruntime backend, max_batch_size, dynamic
                                       batching, every input and output with type and dims
    DIR/NAME/<version>/model.onnx      the model, and beside it model_card.md / .json (tasks,
                                       labels, thresholds, data splits with sizes and content
                                       hashes, metrics, lineage, the gate's verdict),
                                       compare.md / .json and resolved.json

Exit codes: 0 released; 1 the gate refused (nothing written; the comparison is printed); 2 a bad
argument (nothing written).
"""

import sys
import tempfile
from pathlib import Path

from compare import data_config, model_file

from waterdrop import cli
from waterdrop.config import ConfigError
from waterdrop.records import DataError
from waterdrop.release.compare import Model, compare
from waterdrop.release.report import write_report
from waterdrop.release.repository import latest_version, next_version, publish
from waterdrop.runtime import Predictor


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("candidate", help="the model to release: ONNX file or run folder")
    parser.add_argument("--repository", required=True, help="the model repository folder")
    parser.add_argument("--name", required=True, help="the model's name in the repository")
    parser.add_argument("--deployed", help="the model it replaces (default: the repository's latest version)")
    parser.add_argument("--registry", help="the registry whose tasks' splits are scored")
    parser.add_argument("--pool", nargs="+", help="unlabeled images to count decision changes on")
    parser.add_argument("--pool-size", type=int, default=2000, help="images sampled from --pool")
    parser.add_argument("--force", action="store_true", help="release even when a task is over budget (recorded)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="Triton's max_batch_size")
    args = cli.start(parser.parse_args())
    try:
        if not args.name.replace("_", "").replace("-", "").isalnum():
            raise cli.UsageError(f"--name {args.name!r}: letters, digits, '-' and '_' only (a folder name)")
        candidate = model_file(args.candidate)
        model_dir = Path(args.repository) / args.name
        deployed = model_file(args.deployed) if args.deployed else latest_version(model_dir)
        try:
            cfg = data_config(args.registry, [candidate] + ([deployed] if deployed else []))
        except cli.UsageError:
            if deployed is not None:
                raise
            cfg = None  # a first version: nothing to compare, the card lists no data
        comparison = None
        with tempfile.TemporaryDirectory(prefix="waterdrop-release-") as tmp:
            if deployed is not None:
                record, arrays = compare(Model(deployed, Predictor(deployed)), Model(candidate, Predictor(candidate)),
                                         cfg, pool=[Path(p) for p in args.pool or []], pool_size=args.pool_size)
                record["forced"] = bool(args.force and record["over_budget"])
                written = write_report(record, arrays, Path(tmp))
                print(written["markdown"].read_text())
                if record["over_budget"] and not args.force:
                    print(f"not released: over budget: {', '.join(record['over_budget'])} (--force releases anyway)",
                          file=sys.stderr)
                    return cli.EXIT_PARTIAL
                comparison = record
            folder = publish(candidate, Path(args.repository), args.name, cfg, comparison,
                             Path(tmp) if comparison else None, bool(comparison and comparison["forced"]),
                             args.max_batch_size)
    except (ConfigError, DataError, OSError, ValueError, cli.UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    print(f"released {folder} (version {next_version(model_dir) - 1}); Triton config {model_dir / 'config.pbtxt'}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
