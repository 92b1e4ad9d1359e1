"""Export a checkpoint to one ONNX file (all tasks, dynamic batch, metadata) and check parity.

    python tools/export.py CHECKPOINT_OR_RUN_FOLDER [-o model.onnx] [--thresholds FILE] [--cam] [--overwrite]

Writes <run folder>/model.onnx by default (model.cam.onnx with --cam); an existing file is
refused unless --overwrite. Thresholds come from --thresholds, else from <run
folder>/eval/thresholds.json (training writes it), else from the checkpoint (runs recorded
before thresholds moved beside it); if none exists the checkpoint is evaluated first to
choose them, into <run folder>/eval (eval-2, ... when eval holds other files).

Exit codes: 0 written; 2 a bad argument (nothing written).

--cam adds every task's class activation map as the output <task>.cam (and
<task>.stage2_cam for a cascade): raw maps at the deepest feature level's resolution,
described under "cam" in the metadata; tools/predict.py --cam draws them.
"""

import json
import sys
from pathlib import Path

from waterdrop import cli
from waterdrop.config import ConfigError
from waterdrop.engine.checkpoint import RunFolderError, best_checkpoint, load_net, recorded_thresholds
from waterdrop.evaluation.evaluate import evaluate, thresholds_of
from waterdrop.export import PARITY_TOLERANCE, export_onnx
from waterdrop.progress import Progress
from waterdrop.records import DataError


def choose_thresholds(given: str | None, checkpoint: Path, meta: dict, net, cfg) -> tuple[dict, str]:
    """The thresholds to write into the file, and where they came from."""
    if given:
        cli.check_exists([given], "thresholds file")
        return json.loads(Path(given).read_text()), given
    thresholds, source = recorded_thresholds(checkpoint, meta)
    if thresholds is not None:
        return thresholds, source
    folder = cli.fresh_folder(checkpoint.parent / "eval")
    print(f"{checkpoint.parent / 'eval' / 'thresholds.json'} not found: evaluating {checkpoint.name} into {folder} "
          "to choose thresholds")
    return thresholds_of(evaluate(net, cfg, folder, checkpoint=checkpoint)), str(folder / "thresholds.json")


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("checkpoint", help="a .pth checkpoint, or a run folder (its kept checkpoint, train.checkpoint)")
    parser.add_argument("-o", "--output",
                        help="ONNX file (default: <run folder>/model.onnx; model.cam.onnx with --cam)")
    parser.add_argument("--registry", help="take the tasks' data paths from this registry (same tasks, other data); "
                        "everything else comes from the config stored in the checkpoint")
    parser.add_argument("--thresholds", help="thresholds JSON written by tools/eval.py")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset")
    parser.add_argument("--cam", action="store_true", help="add the class activation maps <task>.cam as outputs")
    cli.add_overwrite(parser)
    args = cli.start(parser.parse_args())
    try:
        checkpoint = best_checkpoint(cli.check_run(args.checkpoint))
        default = checkpoint.parent / ("model.cam.onnx" if args.cam else "model.onnx")
        output = cli.output_path(args.output, default, args.overwrite, folder=False)
        net, cfg, meta = load_net(checkpoint, args.registry)
        thresholds, source = choose_thresholds(args.thresholds, checkpoint, meta, net, cfg)
    except (ConfigError, DataError, RunFolderError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    print(f"thresholds from {source}")
    with Progress("export: tracing, writing and checking against PyTorch", total=1, unit="models",
                  announce=True) as meter:
        parity = export_onnx(net, cfg, thresholds, output, args.opset, cam=args.cam, lineage=meta.get("lineage"))
        meter.update(1)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    print(f"parity with PyTorch at batch 1 and 3 (max abs diff, limit {PARITY_TOLERANCE}):")
    for name, diff in parity.items():
        print(f"  {name}: {diff:.2e}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
