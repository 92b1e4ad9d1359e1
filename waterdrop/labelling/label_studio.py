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
    """The labels a runtime result (``Predictor`` output of the task) chooses, and the model's
    confidence in that choice, Label Studio's prediction ``score`` (annotators sort by it, least
    sure first): the probability of the side chosen (binary), of the least sure label
    (multi-label: tagged or not), of the grade chosen (graded)."""
    kind = task["kind"]
    if kind == "binary":
        positive, probability = result["positive"], float(result["score"])
        chosen = (result.get("subclass") or task["labels"][0]) if positive else task["negative_label"]
        return [chosen], probability if positive else 1.0 - probability
    if kind == "multilabel":
        tags = set(result["tags"])
        sure = [p if label in tags else 1.0 - p for label, p in result["scores"].items()]
        return list(result["tags"]), float(min(sure, default=1.0))
    # graded: "above" holds P(grade > k) for each grade k but the last, so P(grade = k) is a difference.
    at_least = [1.0, *[float(p) for p in result["above"].values()][: len(task["labels"]) - 1], 0.0]
    k = task["labels"].index(result["grade"])
    return [result["grade"]], at_least[k] - at_least[k + 1]


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
    """The labels one annotation gives through the config's control (``labelling_config``), None
    when it gives none (an empty rating)."""
    control = RATING if task["kind"] == "graded" else CHOICES
    for result in annotation.get("result", []):
        value = result.get("value", {}) if result.get("from_name") == control else {}
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
    given: dict[str, list[tuple[str, ...]]] = {}
    for item in export:
        data = item.get("data", {})
        where = f"Label Studio task {item.get('id', '?')}"
        path, owner = data.get("waterdrop_image"), data.get("waterdrop_task")
        if not path or owner != task["name"]:
            out.problems.append(f"{where} ({data.get(IMAGE, 'no image')}): not exported by waterdrop for task "
                                f"{task['name']} (its waterdrop_task is {owner!r})")
            continue
        if not os.path.isfile(path):
            out.problems.append(f"{where}: its image {path} does not exist here")
            continue
        answers = []
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
            answers.append(tuple(labels))
        # One image exported twice (two rounds in one project) pools its annotations.
        given.setdefault(os.path.realpath(path), []).extend(answers)
    for path, answers in given.items():
        if not answers:
            out.counts["images without an annotation"] += 1
            continue
        votes = Counter(answers)
        winner, count = votes.most_common(1)[0]
        if len(votes) > 1:
            out.disagreements.append({"image": path, "annotations": [list(a) for a in answers]})
            if resolve != "majority" or count * 2 <= len(answers):
                out.counts["images left out: annotators disagree"] += 1
                continue
            out.counts["images decided by majority"] += 1
        out.labels[path] = list(winner)
        out.counts["images imported"] += 1
    return out


def merge_into_manifest(manifest: str | Path, labels: dict[str, list[str]], overwrite: bool = False,
                        negative_label: str | None = None) -> dict:
    """Add ``labels`` (image path -> labels) to a JSONL manifest (created if missing), image
    paths written relative to it. An image the manifest already holds: a line without labels
    (a selection's ``to_label.jsonl``) takes them; a line with the same labels stays (no label
    and the ``negative_label`` alone are the same); a line with other labels is a conflict,
    and nothing is written unless ``overwrite``.

    Returns counts: added, filled, unchanged, relabelled (and ``relabelled_images``).

    Raises:
        LabellingError: conflicts without ``overwrite``, or a manifest line that is not JSON.
    """
    manifest = Path(manifest)
    folder = os.path.realpath(manifest.parent)

    def same(a: list[str], b: list[str]) -> bool:
        return set(a) - {negative_label} == set(b) - {negative_label}

    lines: list[dict] = []
    if manifest.is_file():
        for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LabellingError(f"{manifest}:{number}: not JSON ({err.msg})") from err
    position = {os.path.realpath(os.path.join(folder, line["image"])): k for k, line in enumerate(lines)
                if isinstance(line, dict) and "image" in line}
    counts = Counter()
    conflicts, relabelled = [], []
    for path, given in labels.items():
        path = os.path.realpath(path)
        k = position.get(path)
        if k is None:
            lines.append({"image": os.path.relpath(path, folder), "labels": given})
            position[path] = len(lines) - 1
            counts["added"] += 1
        elif "labels" not in lines[k]:
            lines[k] = {**lines[k], "labels": given}
            counts["filled"] += 1
        elif same(lines[k]["labels"], given):
            counts["unchanged"] += 1
        else:
            (relabelled if overwrite else conflicts).append(
                {"image": path, "manifest": lines[k]["labels"], "label_studio": given})
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
    return {key: counts[key] for key in ("added", "filled", "unchanged")} | {
        "relabelled": len(relabelled), "relabelled_images": relabelled}
