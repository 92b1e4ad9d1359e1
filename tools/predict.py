"""Score images with an exported model: one JSON line per image on stdout (no torch needed).

    python tools/predict.py MODEL.onnx PATH [PATH ...] [--batch-size N] [--device cpu|cuda]

PATH is an image or a folder (searched recursively). A file that cannot be decoded gives
an error line for that file and the run goes on.
"""

import argparse
import json
import sys

from waterdrop.runtime import Predictor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="ONNX file written by tools/export.py")
    parser.add_argument("paths", nargs="+", help="images or folders")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="CPU threads for onnxruntime")
    args = parser.parse_args()
    predictor = Predictor(args.model, args.device, args.threads)
    errors = 0
    for result in predictor.predict_paths(args.paths, args.batch_size):
        errors += "error" in result
        print(json.dumps(result), flush=True)
    if errors:
        print(f"{errors} image(s) could not be decoded", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
