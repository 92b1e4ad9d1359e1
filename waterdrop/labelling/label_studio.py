"""The Label Studio round trip of one task: its labelling config, a selection of images as Label
Studio tasks with the model's predictions, and an export of the annotations back into the
task's JSONL manifest.

A task is described by a plain dict (``name``, ``kind``, ``labels``, ``negative_label``), the
shape of a task's entry in an exported model's metadata, so either a model file or a task YAML
describes it. How each kind is labelled:

* binary: one choice among the negative label and the positive sub-classes;
* multilabel: any number of the labels (none chosen: no tag applies);
* graded: a rating of 1 to the number of grades, grade ``k`` being the ``k``-th label.

Each exported Label Studio task carries the image's path and the task's name in its data
(``waterdrop_image``, ``waterdrop_task``), so that an export maps back to files exactly,
whatever URL Label Studio shows the image under. Torch-free and standard library only.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

CHOICES = "label"
RATING = "grade"
IMAGE = "image"
#: Label Studio serves files under its LOCAL_FILES_DOCUMENT_ROOT at this path.
LOCAL_FILES_PREFIX = "/data/local-files/?d="


class LabellingError(ValueError):
    """A selection, an export or a manifest that cannot go through as asked; the message says why."""


def labelling_config(task: dict) -> str:
    """The Label Studio labelling config (XML) of a task."""
    name, kind, labels = task["name"], task["kind"], list(task["labels"])
    if kind == "graded":
        legend = ", ".join(f"{k} = {label}" for k, label in enumerate(labels, 1))
        control = f'  <Rating name="{RATING}" toName="{IMAGE}" maxRating="{len(labels)}" required="true"/>\n'
        header = f"{name}: rate the image ({legend})"
    else:
        single = kind == "binary"
        values = [task["negative_label"], *labels] if single else labels
        options = "".join(f"    <Choice value={quoteattr(value)}/>\n" for value in values)
        choice, required = ("single", ' required="true"') if single else ("multiple", "")
        control = (f'  <Choices name="{CHOICES}" toName="{IMAGE}" choice="{choice}" showInline="true"{required}>\n'
                   f"{options}  </Choices>\n")
        header = f"{name}: {'choose one' if single else 'choose every label that applies (none: no label applies)'}"
    image = f'<Image name="{IMAGE}" value="$image"/>'
    return f"<View>\n  <Header value={quoteattr(header)}/>\n  {image}\n{control}</View>\n"


def result_for(task: dict, labels: list[str]) -> list[dict]:
    """A Label Studio result (an annotation's or a prediction's) that says ``labels``."""
    if task["kind"] == "graded":
        return [{"from_name": RATING, "to_name": IMAGE, "type": "rating",
                 "value": {"rating": task["labels"].index(labels[0]) + 1}}]
    return [{"from_name": CHOICES, "to_name": IMAGE, "type": "choices", "value": {"choices": list(labels)}}]


def model_choice(task: dict, result: dict) -> tuple[list[str], float]:
    """The labels a runtime result (``Predictor`` output of the task) chooses, and its score:
    the positive probability (binary), the highest label probability (multilabel), the
    expected grade over the grades (graded)."""
    kind = task["kind"]
    if kind == "binary":
        chosen = (result.get("subclass") or task["labels"][0]) if result["positive"] else task["negative_label"]
        return [chosen], float(result["score"])
    if kind == "multilabel":
        return list(result["tags"]), float(max(result["scores"].values(), default=0.0))
    return [result["grade"]], float(result["score"])


def image_url(path: str, root: str, prefix: str = LOCAL_FILES_PREFIX) -> str:
    """Where Label Studio finds the image: ``prefix`` + its path relative to ``root``."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if relative.startswith(".."):
        raise LabellingError(f"{path} is not under the image root {root}; give an --image-root above every image")
    return prefix + quote(relative.replace(os.sep, "/"), safe="/")


def labelling_tasks(task: dict, paths: list[str], root: str, prefix: str = LOCAL_FILES_PREFIX,
                    predictions: list[dict | None] | None = None, model_version: str = "",
                    extra: list[dict] | None = None) -> list[dict]:
    """Label Studio tasks (the JSON its import takes) for ``paths``, each with the model's
    prediction where one is given (a runtime result of the task) and ``extra`` data fields
    (e.g. the selection's rank)."""
    tasks = []
    for k, path in enumerate(paths):
        data = {IMAGE: image_url(path, root, prefix), "waterdrop_image": os.path.abspath(path),
                "waterdrop_task": task["name"], **((extra or [{}] * len(paths))[k])}
        item = {"data": data}
        result = predictions[k] if predictions else None
        if result is not None:
            chosen, score = model_choice(task, result)
            item["predictions"] = [{"model_version": model_version, "score": round(score, 6),
                                    "result": result_for(task, chosen)}]
        tasks.append(item)
    return tasks


def annotation_labels(task: dict, annotation: dict) -> list[str] | None:
    """The labels one annotation gives, None when it gives none (an empty rating)."""
    for result in annotation.get("result", []):
        value = result.get("value", {})
        if task["kind"] == "graded" and "rating" in value:
            rating = int(value["rating"])
            if not 1 <= rating <= len(task["labels"]):
                return [f"rating {rating}"]  # named as unknown by the caller
            return [task["labels"][rating - 1]]
        if task["kind"] != "graded" and "choices" in value:
            return sorted(value["choices"])
    return [] if task["kind"] == "multilabel" else None


@dataclass
class Imported:
    """What an export holds for the manifest, and what it could not give."""

    labels: dict[str, list[str]] = field(default_factory=dict)  # image path -> labels
    counts: Counter = field(default_factory=Counter)
    disagreements: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # reasons nothing may be written


def read_export(task: dict, export: list[dict], resolve: str = "skip") -> Imported:
    """The labels of a Label Studio JSON export of ``task``'s images.

    Cancelled (skipped) annotations and tasks nobody annotated are counted, not imported.
    Annotators who disagree: the task is left out and reported (``resolve`` "skip"), or the
    labels most annotators gave win where they are more than half (``resolve`` "majority").
    Unknown label names and tasks that did not come from this task's export are problems:
    the caller writes nothing then.
    """
    if not isinstance(export, list):
        raise LabellingError("not a Label Studio JSON export (a list of tasks); export the project as JSON")
    allowed = set(task["labels"]) | ({task["negative_label"]} if task["kind"] == "binary" else set())
    out = Imported()
    for item in export:
        data = item.get("data", {})
        where = f"Label Studio task {item.get('id', '?')}"
        path, owner = data.get("waterdrop_image"), data.get("waterdrop_task")
        if not path or owner != task["name"]:
            out.problems.append(f"{where} ({data.get(IMAGE, 'no image')}): not exported by waterdrop for task "
                                f"{task['name']} (its waterdrop_task is {owner!r})")
            continue
        given = []
        for annotation in item.get("annotations", []):
            if annotation.get("was_cancelled"):
                out.counts["cancelled annotations"] += 1
                continue
            labels = annotation_labels(task, annotation)
            if labels is None:
                out.counts["empty annotations"] += 1
                continue
            unknown = sorted(set(labels) - allowed)
            if unknown:
                out.problems.append(f"{where} ({path}): unknown label {', '.join(unknown)} (the task's labels: "
                                    f"{', '.join(sorted(allowed))})")
                continue
            given.append(tuple(labels))
        if not given:
            out.counts["tasks without an annotation"] += 1
            continue
        votes = Counter(given)
        if len(votes) > 1:
            winner, count = votes.most_common(1)[0]
            out.disagreements.append({"image": path, "annotations": [list(v) for v in given]})
            if resolve != "majority" or count * 2 <= len(given):
                out.counts["tasks left out: annotators disagree"] += 1
                continue
            out.counts["tasks decided by majority"] += 1
        else:
            winner = given[0]
        out.labels[path] = list(winner)
        out.counts["tasks imported"] += 1
    return out


def merge_into_manifest(manifest: str | Path, labels: dict[str, list[str]], overwrite: bool = False) -> dict:
    """Add ``labels`` (image path -> labels) to a JSONL manifest (created if missing), image
    paths written relative to it. An image the manifest already holds keeps its line when the
    labels agree; with other labels it is a conflict: nothing is written unless ``overwrite``.

    Returns counts: added, unchanged, relabelled, conflicts (the images).

    Raises:
        LabellingError: conflicts without ``overwrite``, or a manifest line that is not JSON.
    """
    manifest = Path(manifest)
    folder = manifest.parent.resolve()
    lines: list[dict] = []
    if manifest.is_file():
        for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LabellingError(f"{manifest}:{number}: not JSON ({err.msg})") from err
    position = {os.path.normpath(folder / line["image"]): k for k, line in enumerate(lines) if "image" in line}
    added = unchanged = 0
    conflicts, relabelled = [], []
    for path, given in labels.items():
        path = os.path.normpath(os.path.abspath(path))
        k = position.get(path)
        if k is None:
            lines.append({"image": os.path.relpath(path, folder), "labels": given})
            added += 1
        elif sorted(lines[k].get("labels", [])) == sorted(given):
            unchanged += 1
        else:
            (relabelled if overwrite else conflicts).append(
                {"image": path, "manifest": lines[k].get("labels", []), "label_studio": given})
            if overwrite:
                lines[k] = {**lines[k], "labels": given}
    if conflicts:
        shown = "; ".join(f"{c['image']}: {c['manifest']} here, {c['label_studio']} in Label Studio"
                          for c in conflicts[:5])
        raise LabellingError(f"{len(conflicts)} images already in {manifest} with other labels ({shown}"
                             f"{'; ...' if len(conflicts) > 5 else ''}); nothing written: pass --overwrite to "
                             "take Label Studio's")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    temp = manifest.with_name(f".{manifest.name}.tmp")
    temp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    os.replace(temp, manifest)
    return {"added": added, "unchanged": unchanged, "relabelled": len(relabelled), "conflicts": 0,
            "relabelled_images": relabelled}
