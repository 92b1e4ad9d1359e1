"""Score images with an exported model: one JSON line per image on stdout (no torch needed).

    python tools/predict.py MODEL.onnx PATH [PATH ...] [--batch-size N] [--device cpu|cuda]
                            [--cam DIR [--cam-all-tags]]

PATH is an image or a folder (searched recursively). A file that cannot be decoded gives
an error line for that file and the run goes on.

--cam DIR (refused when it holds files, unless --overwrite) draws the class activation maps of
a model exported with tools/export.py --cam as heat-map overlays (red = strongest evidence;
each map ReLU'd and divided by its maximum) into DIR, one PNG per image and task:

* ``<image stem>.<task>.png``: a binary task's positive-vs-normal evidence, a graded task's score;
* ``<image stem>.<task>.stage2.png``: the second network of a cascade task;
* ``<image stem>.<task>.<tag>.png``: a multi-label task, one per tag whose probability is at or
  above its threshold (before the relation graph), or every tag with --cam-all-tags.

An image whose stem an earlier image already had (same name in another folder) is written as
``<stem>-2``, ``<stem>-3`` ...; each JSON line lists its overlays under ``cam_files``. A model
file without the maps is refused (exit 2).

Exit codes: 0 every image scored; 1 some could not be decoded (their error lines are in the
output, the count on stderr); 2 a path that does not exist, or a model that is not an
exported ONNX file (nothing scored).
"""

import json
import sys
from pathlib import Path

from waterdrop import cli
from waterdrop.kinds import kind_of
from waterdrop.overlay import UniqueStems, overlay, overlay_name, write_png
from waterdrop.progress import Progress
from waterdrop.runtime import NO_CAMS, Predictor


def write_overlays(folder: Path, stem: str, result: dict, tasks: dict, all_tags: bool) -> list[str]:
    """The overlays of one image's maps (``result["cams"]``) on the image as it was scored
    (``result["rgb"]``); returns the files' names."""
    image = result["rgb"]
    names = []
    for key, cam in result["cams"].items():
        task, _, stage = key.partition(".")
        entry = tasks[task]
        for label, one in kind_of(entry["kind"]).cam_views(entry, result["tasks"][task], cam, all_tags):
            name = overlay_name(stem, task, label, stage2=stage == "stage2")
            write_png(folder / name, overlay(image, one))
            names.append(name)
    return names


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("model", help="ONNX file written by tools/export.py")
    parser.add_argument("paths", nargs="+", help="images or folders")
    parser.add_argument("--batch-size", type=int, default=16, help="images per onnxruntime run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="onnxruntime's provider")
    parser.add_argument("--threads", type=int, help="CPU threads for onnxruntime (default: onnxruntime's)")
    parser.add_argument("--cam", metavar="DIR", help="write class activation map overlays (PNG) into DIR")
    parser.add_argument("--cam-all-tags", action="store_true",
                        help="with --cam: an overlay for every tag of a multi-label task, not only those at or above "
                             "their threshold")
    cli.add_overwrite(parser)
    args = cli.start(parser.parse_args())
    try:
        cli.check_exists(args.paths, "image or folder")
        predictor = Predictor(cli.check_onnx_file(args.model), args.device, args.threads)
        if args.cam and not predictor.cam_outputs:
            raise cli.UsageError(f"{args.model}: {NO_CAMS}")
        folder = cli.output_path(args.cam, args.cam, args.overwrite) if args.cam else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
    tasks, stems = {t["name"]: t for t in predictor.tasks}, UniqueStems()
    with Progress("predict") as meter:
        for result in predictor.predict_paths(args.paths, args.batch_size, cams=bool(folder)):
            meter.update(1, failed="error" in result)
            if "cams" in result:
                result["cam_files"] = write_overlays(folder, stems(result["image"]), result, tasks, args.cam_all_tags)
                del result["cams"], result["rgb"]
            meter.clear()  # on a terminal the progress line shares the screen with the JSON lines
            print(json.dumps(result), flush=True)
    if meter.failed:
        print(f"{meter.failed} of {meter.done} image(s) could not be decoded (see their error lines)", file=sys.stderr)
        return cli.EXIT_PARTIAL
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
