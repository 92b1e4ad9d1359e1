"""Quantize an exported model to int8 (static QDQ, per-channel), behind an accuracy gate.

    python tools/quantize.py MODEL.onnx --calibration FOLDER_OR_MANIFEST [...]
        [--registry REGISTRY_OR_RUN | --eval TASK=FOLDER_OR_MANIFEST ...] [-o MODEL.int8.onnx]
        [--max-ap-drop 0.005] [--force] [--calibration-images 256] [--calibration-method minmax]
        [--max-fp32-activations N]

Calibration images (folders, searched recursively, or JSONL manifests; training images of
every task, not the test splits) are drawn from the sources in turn, so every task's data
weighs the same, and go through the runtime's own preprocessing; undecodable ones are
counted and skipped. Every task is scored
in fp32 and int8 by its kind's metric (binary: AP; multi-label: mAP; graded: mean boundary
AP) on its test split (else val) from the registry the model was trained with: by default the
run folder next to MODEL.onnx (its config/resolved.json); --registry names a run folder or a
registry YAML; --eval gives each task's data instead.
When the all-int8 file drops a task by more than --max-ap-drop on its val split, the
quantized activations are ranked by how much each costs the tasks over the budget (each kept
fp32 in turn, on 64 calibration images), and the fewest of the most sensitive are kept in
fp32 until every task is within the budget on its val split (at most --max-fp32-activations;
0 turns the search off); the test split then judges the chosen file once. The activations
and nodes kept in fp32, the counts tried and the speed of both files are printed and recorded.
The int8 file is written only when no task drops by more than --max-ap-drop on its test
split (else val) nor on its val split (exit code 1 otherwise, naming the task and its drop,
and what to try next) unless --force. The default
output, MODEL.int8.onnx beside MODEL, is refused when it exists, unless --overwrite. Thresholds are chosen again on the
int8 scores of each task's val split; the int8 file's metadata records precision, calibration,
every task's fp32 and int8 metric and drop, and the thresholds. A model exported with --cam
keeps its class activation maps; how closely the int8 maps follow the fp32 maps on 32
calibration images is printed and recorded (not gated). Needs no torch: the runtime install
plus onnx (pip install "waterdrop[quantize]").

Exit codes: 0 written; 1 refused by the gate (nothing written), or written with some
calibration or evaluation images that could not be decoded (counted); 2 a bad argument
(nothing written).

When the gate refuses, the fp32 file is the one to serve; to get an int8 file that passes,
calibrate on more images drawn from every task's training data (--calibration-images 512 with
all the tasks' train folders or manifests), or accept the drop for that task knowingly
(--max-ap-drop, or --force and check the task on your own data).
"""

import argparse
import sys
from pathlib import Path

from waterdrop import cli

try:
    from waterdrop.mixed_precision import ORDERS
    from waterdrop.quantize import (
        CALIBRATION_METHODS,
        DEFAULT_CALIBRATION_METHOD,
        DEFAULT_MAX_DROP,
        DEFAULT_ORDER,
        quantize,
    )
    from waterdrop.scoring import TaskData, load_config, task_data_from_config
except ModuleNotFoundError as err:  # onnx is no dependency of the runtime install
    print(f"error: quantization needs onnx beside the runtime ({err}); pip install \"waterdrop[quantize]\"",
          file=sys.stderr)
    sys.exit(cli.EXIT_USAGE)
from waterdrop.runtime import Predictor

NEXT_STEPS = """what now:
  - serve {model} (fp32) meanwhile: it is the file that passed evaluation;
  - calibrate on more images, drawn from every task's training data:
      --calibration <each task's train folder or manifest> --calibration-images {count}
  - or accept the drop for this model knowingly: --max-ap-drop <larger>, or --force, and check
    the task that dropped on your own data before serving the int8 file."""


def tasks_to_measure(args: argparse.Namespace) -> dict[str, TaskData]:
    entries = Predictor(args.model).tasks
    if args.eval:
        pairs = [item.split("=", 1) for item in args.eval]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"--eval takes TASK=FOLDER_OR_MANIFEST, got {args.eval}")
        known = [entry["name"] for entry in entries]
        unknown = [name for name, _ in pairs if name not in known]
        if unknown:
            raise ValueError(f"--eval names tasks {unknown}; the model's tasks are {', '.join(known)}")
        return {name: TaskData(name, Path(path), "given") for name, path in pairs}
    source = Path(args.registry) if args.registry else Path(args.model).parent
    return task_data_from_config(load_config(source), entries)


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("model", help="the fp32 ONNX file written by tools/export.py")
    parser.add_argument("--calibration", required=True, nargs="+", metavar="FOLDER_OR_MANIFEST",
                        help="calibration images: folders or JSONL manifests, drawn from at random")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--registry", help="a run folder or a registry YAML giving the tasks' data (default: the "
                        "run folder of MODEL)")
    source.add_argument("--eval", action="append", metavar="TASK=PATH",
                        help="a task's evaluation data (folder per label or JSONL manifest); once per task")
    parser.add_argument("-o", "--output", help="the int8 file (default: MODEL.int8.onnx)")
    cli.add_overwrite(parser)
    parser.add_argument("--max-ap-drop", type=float, default=DEFAULT_MAX_DROP,
                        help=f"largest allowed drop of any task's metric (default {DEFAULT_MAX_DROP})")
    parser.add_argument("--force", action="store_true", help="write the int8 file even when a task drops more")
    parser.add_argument("--calibration-images", type=int, default=256, help="how many images calibrate")
    parser.add_argument("--calibration-method", choices=list(CALIBRATION_METHODS), default=DEFAULT_CALIBRATION_METHOD,
                        help=f"how activation ranges are chosen (default {DEFAULT_CALIBRATION_METHOD})")
    parser.add_argument("--max-fp32-activations", type=int, default=None, metavar="N",
                        help="keep at most N quantized activations in fp32 to pass the gate (default: as many as it "
                        "takes; 0: none, the all-int8 file or nothing)")
    parser.add_argument("--search-order", choices=list(ORDERS), default=DEFAULT_ORDER,
                        help="rank activations by their gain, or by their gain per share of the MACs they put in fp32 "
                        f"(default {DEFAULT_ORDER})")
    parser.add_argument("--batch-size", type=int, default=16, help="images per onnxruntime run")
    args = cli.start(parser.parse_args())
    try:
        cli.check_onnx_file(args.model)
        cli.check_exists(args.calibration, "calibration folder or manifest")
        output = cli.output_path(args.output, Path(args.model).with_suffix(".int8.onnx"), args.overwrite, folder=False)
        if args.max_fp32_activations is not None and args.max_fp32_activations < 0:
            raise ValueError(f"--max-fp32-activations must be 0 or more, got {args.max_fp32_activations}")
        record = quantize(args.model, output, args.calibration, tasks_to_measure(args), args.max_ap_drop, args.force,
                          args.calibration_images, args.batch_size, args.calibration_method, args.max_fp32_activations,
                          args.search_order)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    calibration = record["calibration"]
    print(f"calibrated on {calibration['images']} images of {', '.join(calibration['sources'])}"
          + (f"; {calibration['undecodable']} undecodable, skipped" if calibration["undecodable"] else ""))
    print("| task | metric | split | images | fp32 | int8 | drop | val drop |\n|---|---|---|---|---|---|---|---|")
    for name, task in record["tasks"].items():
        values = [task["fp32"], task["int8"], task["drop"], task.get("val", {}).get("drop")]
        print(f"| {name} | {task['metric']} | {task['split']} | {task['images']} | "
              + " | ".join("n/a" if v is None else f"{v:.4f}" for v in values) + " |")
    for name, task in record["tasks"].items():
        chosen = task["thresholds"]
        if chosen and chosen["chosen_on"] != "val":
            print(f"{name}: thresholds {chosen['chosen_on']}")
        elif chosen and isinstance(chosen["int8"], dict):
            change = max(abs(chosen["int8"][k] - chosen["fp32"][k]) for k in chosen["int8"])
            print(f"{name}: thresholds per label chosen again on val; largest change from fp32 {change:.4f}")
        elif chosen:
            print(f"{name}: threshold chosen again on val: fp32 {chosen['fp32']:.4f} -> int8 {chosen['int8']:.4f}")
    mixed = record["mixed_precision"]
    if mixed["all_int8_over_budget"]["val"]:
        print(f"all-int8 over the budget on val for {', '.join(mixed['all_int8_over_budget']['val'])}; "
              + mixed.get("result", "no activation kept in fp32 (--max-fp32-activations 0)"))
        if mixed.get("tried"):
            steps = [f"{step['fp32_activations']} ({'over' if step['over_budget'] else 'within'})"
                     for step in mixed["tried"]]
            print(f"fp32 activations tried (chosen on {mixed['chosen_on']}): {', '.join(steps)}")
        if mixed["kept_fp32"]:
            print(f"kept in fp32: {len(mixed['kept_fp32'])} activations ({', '.join(mixed['kept_fp32'])}); "
                  f"{len(mixed['nodes_fp32'])} nodes compute in fp32 around them, "
                  f"{100 * mixed['fp32_mac_share']:.1f} % of the convolution MACs")
    speed = record["speed"]
    print(f"speed on this machine: fp32 {speed['images_per_s']['fp32']:.0f} images/s, int8 "
          f"{speed['images_per_s']['int8']:.0f} images/s ({speed['int8_over_fp32']:.2f}x)")
    for output_name, agreement in record.get("cams", {}).items():
        correlation = "n/a" if agreement["correlation"] is None else f"{agreement['correlation']:.3f}"
        print(f"{output_name}: int8 maps vs fp32 on {agreement['maps']} maps: correlation {correlation}, "
              f"drawn maps differ by {agreement['drawn_mean_abs_difference']:.3f} on average (0-1; not gated)")
    for failure in record["failures"]:
        print(f"{'over the budget (written anyway, --force)' if args.force else 'refused'}: {failure}",
              file=sys.stderr)
    if not record["written"]:
        print(f"{output} NOT written: int8 loses more than {args.max_ap_drop} on a task"
              + (f"; the older {output} is left as it was" if output.exists() else ""), file=sys.stderr)
        print(NEXT_STEPS.format(model=args.model, count=max(512, 2 * args.calibration_images)), file=sys.stderr)
        return cli.EXIT_PARTIAL
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    undecodable = calibration["undecodable"] + sum(task.get("undecodable", 0) for task in record["tasks"].values())
    if undecodable:
        print(f"{undecodable} image(s) could not be decoded and were left out (listed in the file's metadata, "
              "quantization)", file=sys.stderr)
        return cli.EXIT_PARTIAL
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
