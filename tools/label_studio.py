"""Label a task's images in Label Studio and bring the labels back into its manifest.

    python tools/label_studio.py config --registry R --task T [-o label_config.xml]
    python tools/label_studio.py export SELECTION --registry R --task T [--model MODEL.onnx]
        [--image-root DIR] [--url-prefix /data/local-files/?d=] [--limit N] [--out DIR]
    python tools/label_studio.py import EXPORT.json --registry R --task T --manifest M.jsonl
        [--disagreement skip|majority] [--overwrite]

config: the task's labelling config (binary: one choice among the negative label and the
sub-classes; multi-label: any of the labels; graded: a rating, 1 = the first grade).

export: SELECTION is any list of images to label: a CSV with a ``path`` column (the output of
tools/search_pool.py query, tools/select_for_labeling.py, tools/find_noisy.py) or a JSONL
manifest. Writes into --out (default: beside SELECTION, label_studio/): tasks.json (import it
into the project), label_config.xml (the project's labelling config) and summary.json. Every
task's data has the selection's rank and its CSV's other columns (``waterdrop_similarity``,
``waterdrop_prob``, ...), which Label Studio's data manager sorts by. With --model (a model
that serves the task) every task also carries the model's current choice as a prediction
(``model_version``: the file's name and model hash; ``score``: its confidence in the choice),
so annotators correct it rather than start from nothing. Images are
shown at --url-prefix + their path relative to --image-root (default: the selection's deepest
common folder): run Label Studio with LOCAL_FILES_SERVING_ENABLED=true and
LOCAL_FILES_DOCUMENT_ROOT=<image root>, and add a Local files storage on a folder inside it
that holds the images (Label Studio refuses the root itself; see the README), or give
--url-prefix of a server that serves the image root.

import: EXPORT.json is the project's export in Label Studio's JSON format. Label names are
checked against the task YAML; cancelled (skipped) annotations and images nobody annotated are
counted; images whose annotators disagree are listed and left out (--disagreement majority:
more than half decide; an image exported twice pools its annotations). A Label Studio task not
exported by this tool for this task, an image that is not there, or an unknown label stops the
import before anything is written; so does an image the manifest already holds with other
labels, unless --overwrite. A manifest line without labels (a selection's to_label.jsonl) takes
them; new images are appended, paths relative to the manifest.

Exit codes: 0 done; 1 done, with images left out (disagreement, no annotation); 2 a bad argument
or export (nothing written).
"""

import csv
import json
import os
import sys
from pathlib import Path

from waterdrop import cli
from waterdrop.labelling.label_studio import (
    LOCAL_FILES_PREFIX,
    LabellingError,
    labelling_config,
    labelling_tasks,
    merge_into_manifest,
    read_export,
)
from waterdrop.records import is_manifest, parse_manifest


def task_description(registry: str, name: str) -> dict:
    """The task's name, kind, labels and negative label, from the registry's task YAML."""
    from waterdrop.config import load_registry
    from waterdrop.registry import registered_heads

    cfg = load_registry(cli.check_registry(registry))
    task = next((t for t in cfg.tasks if t.name == name), None)
    if task is None:
        raise cli.UsageError(f"no task {name!r} in {registry} (its tasks: {', '.join(cfg.task_names)})")
    kind = registered_heads()[task.head_type].kind
    return {"name": task.name, "kind": kind, "labels": list(task.labels), "negative_label": task.negative_label}


def _number(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def read_selection(selection: str) -> dict[str, dict]:
    """Image path -> the selection's other columns (a CSV's: similarity, prob, rank...), in
    order, each image once."""
    rows: dict[str, dict] = {}
    if is_manifest(selection):
        for line in parse_manifest(selection):
            if line.item is not None:
                rows.setdefault(os.path.abspath(line.item["image"]), {})
    elif selection.lower().endswith(".csv"):
        with open(selection, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            if "path" not in (reader.fieldnames or []):
                raise cli.UsageError(f"{selection}: no 'path' column (columns: {', '.join(reader.fieldnames or [])})")
            folder = os.path.dirname(os.path.abspath(selection))
            for row in reader:
                if row["path"]:
                    path = os.path.abspath(os.path.join(folder, row.pop("path")))
                    rows.setdefault(path, {f"waterdrop_{key}": _number(value) for key, value in row.items()})
    else:
        raise cli.UsageError(f"{selection}: give a .csv with a 'path' column or a .jsonl manifest")
    return rows


def export(args, task: dict) -> int:
    selected = read_selection(args.selection)
    paths = list(selected)[: args.limit]
    if not paths:
        raise cli.UsageError(f"{args.selection}: no images")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise cli.UsageError(f"{len(missing)} images of the selection do not exist, first {missing[0]}")
    root = args.image_root or os.path.commonpath([os.path.dirname(path) for path in paths])
    predictions, version, undecodable = None, "", []
    if args.model:
        from waterdrop.runtime import Predictor

        predictor = Predictor(cli.check_onnx_file(args.model))
        if task["name"] not in [t["name"] for t in predictor.tasks]:
            raise cli.UsageError(f"{args.model} has no task {task['name']} to predict (a new task: export without "
                                 "--model; a search's similarity still comes with every task)")
        version = f"{Path(args.model).name} {predictor.meta.get('lineage', {}).get('model_hash', '')[:12]}".strip()
        by_path = {}
        for result in predictor.predict_paths(paths):
            if "error" in result:
                undecodable.append(result["error"])
            else:
                by_path[os.path.abspath(result["image"])] = result["tasks"][task["name"]]
        predictions = [by_path.get(path) for path in paths]
    tasks = labelling_tasks(task, paths, root, args.url_prefix, predictions, version,
                            [{**selected[path], "waterdrop_rank": rank} for rank, path in enumerate(paths, 1)])
    out = cli.output_path(args.out, Path(args.selection).resolve().parent / "label_studio", args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1) + "\n")
    (out / "label_config.xml").write_text(labelling_config(task))
    summary = {"task": task["name"], "selection": args.selection, "tasks": len(tasks), "image_root": root,
               "url_prefix": args.url_prefix, "model_version": version or None,
               "with_prediction": sum("predictions" in t for t in tasks), "undecodable": undecodable}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(tasks)} Label Studio tasks ({summary['with_prediction']} with the model's prediction) in "
          f"{out / 'tasks.json'}; labelling config in {out / 'label_config.xml'}; image root {root}", file=sys.stderr)
    return cli.EXIT_PARTIAL if undecodable else cli.EXIT_OK


def import_(args, task: dict) -> int:
    try:
        exported = json.loads(Path(args.export).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise cli.UsageError(f"{args.export}: not a readable JSON export ({err})") from err
    found = read_export(task, exported, args.disagreement)
    if found.problems:
        shown = "\n  ".join(found.problems[:10])
        more = f"\n  ... and {len(found.problems) - 10} more" if len(found.problems) > 10 else ""
        raise cli.UsageError(f"{len(found.problems)} problems in {args.export}; nothing written:\n  {shown}{more}")
    counts = merge_into_manifest(args.manifest, found.labels, args.overwrite, task["negative_label"])
    report = {"task": task["name"], "manifest": args.manifest, **dict(found.counts),
              **{k: v for k, v in counts.items() if k != "relabelled_images"},
              "disagreements": found.disagreements, "relabelled_images": counts["relabelled_images"]}
    print(json.dumps(report))
    left_out = found.counts["images left out: annotators disagree"] + found.counts["images without an annotation"]
    print(f"{counts['added']} images added to {args.manifest}, {counts['filled']} filled in, {counts['unchanged']} "
          f"already there, {counts['relabelled']} relabelled; {found.counts['cancelled annotations']} cancelled "
          f"annotations, {left_out} images left out ({len(found.disagreements)} with disagreeing annotators)",
          file=sys.stderr)
    return cli.EXIT_PARTIAL if left_out else cli.EXIT_OK


def main() -> int:
    parser = cli.parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="the task's labelling config")
    out = commands.add_parser("export", help="a selection as Label Studio tasks")
    out.add_argument("selection", help="a .csv with a path column, or a .jsonl manifest")
    out.add_argument("--model", help="an exported .onnx file: its choice becomes each task's prediction")
    out.add_argument("--image-root", help="the folder image URLs are relative to")
    out.add_argument("--url-prefix", default=LOCAL_FILES_PREFIX, help="what precedes the relative path in a URL")
    out.add_argument("--limit", type=int, help="the first N images only")
    out.add_argument("--out", help="output folder")
    cli.add_overwrite(out)
    back = commands.add_parser("import", help="a Label Studio JSON export into the task's manifest")
    back.add_argument("export", help="the project's JSON export")
    back.add_argument("--manifest", required=True, help="the task's JSONL manifest (created if missing)")
    back.add_argument("--disagreement", choices=["skip", "majority"], default="skip",
                      help="what decides a task whose annotators disagree")
    cli.add_overwrite(back)
    for sub in (config, out, back):
        sub.add_argument("--registry", required=True, help="the registry YAML")
        sub.add_argument("--task", required=True, help="the task's name")
    config.add_argument("-o", "--output", help="write the config here (default: print it)")
    args = cli.start(parser.parse_args())
    try:
        task = task_description(args.registry, args.task)
        if args.command == "config":
            text = labelling_config(task)
            if args.output:
                Path(args.output).write_text(text)
            else:
                print(text, end="")
            return cli.EXIT_OK
        return export(args, task) if args.command == "export" else import_(args, task)
    except (LabellingError, cli.UsageError, ValueError) as err:
        print(f"label_studio: {err}", file=sys.stderr)
        return cli.EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
