"""Export a checkpoint to one ONNX file (all tasks, dynamic batch, metadata) and check parity.

    python tools/export.py CHECKPOINT_OR_RUN_FOLDER [-o model.onnx] [--thresholds FILE] [--cam]

Thresholds come from --thresholds, else from the checkpoint (eval and train record them
there), else from <checkpoint folder>/eval/thresholds.json; if none exists the checkpoint
is evaluated first to choose them.

--cam adds every task's class activation map as the output <task>.cam (and
<task>.stage2_cam for a cascade): raw maps at the deepest feature level's resolution,
described under "cam" in the metadata; tools/predict.py --cam draws them.
"""

import argparse
import json
import sys
from pathlib import Path

from waterdrop.engine.checkpoint import best_checkpoint, load_net
from waterdrop.evaluation.evaluate import evaluate
from waterdrop.export import PARITY_TOLERANCE, export_onnx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .pth checkpoint, or a run folder (its best checkpoint)")
    parser.add_argument("-o", "--output", help="ONNX file (default: <checkpoint folder>/model.onnx)")
    parser.add_argument("--registry", help="take the tasks' data paths from this registry (same tasks, other data); "
                        "everything else comes from the config stored in the checkpoint")
    parser.add_argument("--thresholds", help="thresholds JSON written by tools/eval.py")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--cam", action="store_true", help="add the class activation maps <task>.cam as outputs")
    args = parser.parse_args()
    checkpoint = best_checkpoint(args.checkpoint)
    net, cfg, meta = load_net(checkpoint, args.registry)
    thresholds_file = Path(args.thresholds) if args.thresholds else checkpoint.parent / "eval" / "thresholds.json"
    if args.thresholds or "thresholds" not in meta:
        if not thresholds_file.is_file():
            print(f"{thresholds_file} not found: evaluating {checkpoint.name} to choose thresholds")
            evaluate(net, cfg, thresholds_file.parent)
        thresholds, source = json.loads(thresholds_file.read_text()), thresholds_file
    else:
        thresholds, source = meta["thresholds"], checkpoint
    print(f"thresholds from {source}")
    output = Path(args.output) if args.output else checkpoint.parent / "model.onnx"
    parity = export_onnx(net, cfg, thresholds, output, args.opset, cam=args.cam)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    print(f"parity with PyTorch at batch 1 and 3 (max abs diff, limit {PARITY_TOLERANCE}):")
    for name, diff in parity.items():
        print(f"  {name}: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
