"""The Label Studio round trip (waterdrop.labelling, tools/label_studio.py): labelling configs, tasks
with the model's predictions, imports checked against the task YAML, and the whole loop through a
real Label Studio server run from its own virtual environment (``make label-studio``)."""

import csv
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from tests.conftest import write_registry
from waterdrop.labelling.client import local_server
from waterdrop.labelling.label_studio import (
    LabellingError,
    labelling_config,
    labelling_tasks,
    merge_into_manifest,
    read_export,
    result_for,
)
from waterdrop.records import read_labeled_manifest

REPO = Path(__file__).resolve().parents[1]
LABEL_STUDIO = REPO / ".venv-labelstudio" / "bin" / "label-studio"
BINARY = {"name": "gross", "kind": "binary", "labels": ["insects", "organs"], "negative_label": "normal"}
TAGS = {"name": "tags", "kind": "multilabel", "labels": ["sky", "boat"], "negative_label": "none"}
GRADES = {"name": "sharp", "kind": "graded", "labels": ["blurry", "soft", "sharp"], "negative_label": "none"}


def _annotation(task: dict, labels: list[str], cancelled: bool = False) -> dict:
    return {"result": [] if cancelled else result_for(task, labels), "was_cancelled": cancelled}


def test_each_kind_gets_a_labelling_config_that_names_its_labels():
    binary = ET.fromstring(labelling_config(BINARY))
    choices = binary.find("Choices")
    assert choices.get("choice") == "single" and choices.get("toName") == "image"
    assert [c.get("value") for c in choices] == ["normal", "insects", "organs"]
    assert ET.fromstring(labelling_config(TAGS)).find("Choices").get("choice") == "multiple"
    rating = ET.fromstring(labelling_config(GRADES)).find("Rating")
    assert rating.get("maxRating") == "3" and "1 = blurry" in ET.fromstring(labelling_config(GRADES)).find(
        "Header").get("value")


def test_tasks_carry_the_image_the_task_and_the_models_choice(tmp_path):
    image = tmp_path / "pool" / "a b.jpg"
    image.parent.mkdir()
    image.write_bytes(b"x")
    results = [{"score": 0.8, "positive": True, "subclass": "organs"}, None, {"score": 0.1, "positive": False}]
    tasks = labelling_tasks(BINARY, [str(image)] * 3, str(tmp_path), predictions=results, model_version="m 1")
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=pool/a%20b.jpg"
    assert tasks[0]["data"]["waterdrop_image"] == str(image) and tasks[0]["data"]["waterdrop_task"] == "gross"
    prediction = tasks[0]["predictions"][0]
    assert prediction["model_version"] == "m 1" and prediction["score"] == 0.8
    assert prediction["result"][0]["value"] == {"choices": ["organs"]}
    assert "predictions" not in tasks[1]
    # The score is the model's confidence in its choice: a sure negative scores high.
    assert tasks[2]["predictions"][0]["score"] == 0.9
    assert tasks[2]["predictions"][0]["result"][0]["value"] == {"choices": ["normal"]}
    tagged = labelling_tasks(TAGS, [str(image)], str(tmp_path), predictions=[
        {"tags": ["boat"], "scores": {"sky": 0.1, "boat": 0.7}}])
    assert tagged[0]["predictions"][0]["score"] == 0.7  # the least sure label: boat tagged at 0.7
    graded = labelling_tasks(GRADES, [str(image)], str(tmp_path), predictions=[
        {"grade": "soft", "score": 1.2, "above": {"blurry": 0.8, "soft": 0.4}}])
    assert graded[0]["predictions"][0]["result"][0]["value"] == {"rating": 2}
    assert graded[0]["predictions"][0]["score"] == pytest.approx(0.4)  # P(grade > blurry) - P(grade > soft)
    with pytest.raises(LabellingError, match="not under the image root"):
        labelling_tasks(BINARY, [str(image)], str(tmp_path / "elsewhere"))


def test_an_export_is_checked_counted_and_merged_without_overwriting(tmp_path):
    def item(number, path, *annotations, task="gross"):
        return {"id": number, "data": {"image": f"/x/{number}", "waterdrop_image": str(path), "waterdrop_task": task},
                "annotations": list(annotations)}

    images = [tmp_path / f"{k}.jpg" for k in range(6)]
    for image in images:
        image.write_bytes(b"x")
    real = [os.path.realpath(image) for image in images]
    export = [item(1, images[0], _annotation(BINARY, ["insects"])),
              item(2, images[1], _annotation(BINARY, ["normal"], cancelled=True)),
              item(3, images[2], _annotation(BINARY, ["normal"]), _annotation(BINARY, ["organs"])),
              item(4, images[3]),
              item(5, images[4], *[_annotation(BINARY, [label]) for label in ("organs", "organs", "normal")])]
    found = read_export(BINARY, export)
    assert found.problems == [] and found.labels == {real[0]: ["insects"]}
    assert found.counts["cancelled annotations"] == 1 and found.counts["images without an annotation"] == 2
    assert found.counts["images left out: annotators disagree"] == 2 and len(found.disagreements) == 2
    majority = read_export(BINARY, export, resolve="majority")
    assert majority.labels[real[4]] == ["organs"] and real[2] not in majority.labels  # 1 to 1: no winner
    twice = read_export(BINARY, [item(1, images[0], _annotation(BINARY, ["insects"])),
                                 item(9, images[0], _annotation(BINARY, ["normal"]))])
    assert twice.labels == {} and twice.disagreements[0]["annotations"] == [["insects"], ["normal"]]
    wrong = read_export(BINARY, [item(6, images[5], _annotation(BINARY, ["cats"])), {"id": 7, "data": {"image": "u"}},
                                 item(8, images[5], _annotation(BINARY, ["normal"]), task="other"),
                                 item(10, tmp_path / "gone.jpg", _annotation(BINARY, ["normal"]))])
    assert len(wrong.problems) == 4 and "unknown label cats" in wrong.problems[0]
    assert "not exported by waterdrop" in wrong.problems[1] and "does not exist" in wrong.problems[3]

    manifest = tmp_path / "data" / "train.jsonl"
    counts = merge_into_manifest(manifest, majority.labels)
    assert counts["added"] == 2
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert {line["image"] for line in lines} == {"../0.jpg", "../4.jpg"}
    before = manifest.read_text()
    with pytest.raises(LabellingError, match="other labels"):
        merge_into_manifest(manifest, {str(images[0]): ["normal"]})
    assert manifest.read_text() == before
    assert merge_into_manifest(manifest, {str(images[0]): ["insects"]})["unchanged"] == 1
    assert merge_into_manifest(manifest, {str(images[0]): ["normal"]}, overwrite=True)["relabelled"] == 1
    # A selection's manifest (no labels yet) is filled in; no label equals the negative label alone;
    # reached through a link, the manifest still knows its images.
    selection = tmp_path / "query" / "to_label.jsonl"
    selection.parent.mkdir()
    selection.write_text("".join(json.dumps(line) + "\n" for line in [{"image": "../1.jpg"},
                                                                      {"image": "../2.jpg", "labels": []}]))
    (tmp_path / "link").symlink_to(selection.parent)
    counts = merge_into_manifest(tmp_path / "link" / "to_label.jsonl", {str(images[1]): ["organs"],
                                                                       str(images[2]): ["normal"]},
                                 negative_label="normal")
    assert (counts["added"], counts["filled"], counts["unchanged"]) == (0, 1, 1)
    assert [json.loads(line)["labels"] for line in selection.read_text().splitlines()] == [["organs"], []]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    if not LABEL_STUDIO.exists():
        if os.environ.get("WATERDROP_REQUIRE_LABEL_STUDIO"):
            pytest.fail(f"{LABEL_STUDIO} is missing; install it with: make label-studio")
        pytest.skip("Label Studio is not installed (make label-studio)")
    folder = tmp_path_factory.mktemp("label_studio")
    (folder / "images").mkdir()
    with local_server(LABEL_STUDIO.parents[1], folder / "data", document_root=folder / "images") as server:
        yield server, folder


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "label_studio.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_a_selection_goes_through_a_real_label_studio_and_back_into_a_manifest_that_trains(
        label_studio, demo_root, tmp_path):
    from waterdrop.config import load_registry
    from waterdrop.engine.train import run_training
    from waterdrop.export import export_onnx
    from waterdrop.model.multitask import MultiTaskNet

    server, folder = label_studio
    registry = write_registry(tmp_path / "registry", demo_root)
    cfg = load_registry(registry)
    task = next(t for t in cfg.tasks if t.name == "disgusting")
    torch.manual_seed(0)
    thresholds = {t.name: 0.5 if t.head_type == "BinaryHead" else dict.fromkeys(t.labels, 0.3) for t in cfg.tasks}
    export_onnx(MultiTaskNet(cfg).eval(), cfg, thresholds, tmp_path / "model.onnx")
    # A selection of ten pool images, as tools/search_pool.py query writes it.
    sources = [record.path for record in read_labeled_manifest(demo_root / "disgusting" / "train.jsonl")][:10]
    images = []
    for k, source in enumerate(sources):
        images.append(folder / "images" / "pool" / f"{k:02d}{source.suffix}")
        images[-1].parent.mkdir(exist_ok=True)
        shutil.copy(source, images[-1])
    with open(tmp_path / "candidates.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, ["rank", "path", "similarity"])
        writer.writeheader()
        writer.writerows({"rank": k + 1, "path": str(path), "similarity": 0.9} for k, path in enumerate(images))
    exported = _tool("export", tmp_path / "candidates.csv", "--registry", registry, "--task", "disgusting",
                     "--model", tmp_path / "model.onnx", "--image-root", folder / "images", "--out", tmp_path / "ls")
    assert exported.returncode == 0, exported.stderr
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert len(tasks) == 10 and all(t["predictions"][0]["result"][0]["value"]["choices"] for t in tasks)

    project = server.create_project("disgusting round 1", (tmp_path / "ls" / "label_config.xml").read_text())
    assert server.add_local_storage(project, folder / "images" / "pool")
    assert server.import_tasks(project, tasks) == 10
    by_rank = {item["data"]["waterdrop_rank"]: item for item in server.tasks(project)}
    # Annotators see the image Label Studio serves from the image root.
    assert server.call("GET", by_rank[1]["data"]["image"], raw=True) == images[0].read_bytes()
    given = {}
    for rank in range(1, 8):  # seven images labelled once each, alternating normal and a sub-class
        label = task.negative_label if rank % 2 else task.labels[rank % len(task.labels)]
        server.annotate(by_rank[rank]["id"], _annotation(BINARY, [label])["result"])
        given[os.path.realpath(images[rank - 1])] = [label]
    server.annotate(by_rank[8]["id"], [], cancelled=True)
    for label in (task.negative_label, task.labels[0]):  # two annotators who disagree
        server.annotate(by_rank[9]["id"], _annotation(BINARY, [label])["result"])
    # rank 10: nobody annotated it
    export = server.export(project)
    (tmp_path / "export.json").write_text(json.dumps(export))

    manifest = tmp_path / "data" / "disgusting_round1.jsonl"
    back = _tool("import", tmp_path / "export.json", "--registry", registry, "--task", "disgusting",
                 "--manifest", manifest)
    assert back.returncode == 1, back.stderr  # done, with images left out
    report = json.loads(back.stdout)
    assert report["added"] == 7 and report["cancelled annotations"] == 1
    assert report["images left out: annotators disagree"] == 1 and report["images without an annotation"] == 2
    assert {os.path.realpath(r.path): r.labels for r in read_labeled_manifest(manifest)} == given

    broken = json.loads(json.dumps(export))
    first = next(item for item in broken if item["annotations"] and not item["annotations"][0]["was_cancelled"])
    first["annotations"][0]["result"][0]["value"]["choices"] = ["kittens"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    before = manifest.read_text()
    refused = _tool("import", tmp_path / "broken.json", "--registry", registry, "--task", "disgusting",
                    "--manifest", manifest)
    assert refused.returncode == 2 and "unknown label kittens" in refused.stderr and manifest.read_text() == before

    # The imported manifest is the task's training split now: it trains.
    task_file = registry.parent / "tasks" / "disgusting.yaml"
    task_yaml = task_file.read_text().replace(str(demo_root / "disgusting" / "train.jsonl"), str(manifest))
    task_file.write_text(task_yaml)
    report = run_training(registry, tmp_path / "run", printer=lambda *a, **k: None)
    assert "disgusting" in report


def test_multi_label_and_graded_configs_go_through_label_studio_too(label_studio):
    server, folder = label_studio
    image = folder / "images" / "kinds" / "one.png"
    image.parent.mkdir(exist_ok=True)
    image.write_bytes(_png())
    cases = [(TAGS, {"tags": ["boat"], "scores": {"sky": 0.2, "boat": 0.9}}, ["boat", "sky"]),
             (GRADES, {"grade": "sharp", "score": 1.8, "above": {"blurry": 0.9, "soft": 0.85}}, ["soft"])]
    for task, prediction, labels in cases:
        project = server.create_project(task["name"], labelling_config(task))
        tasks = labelling_tasks(task, [str(image)], str(folder / "images"), predictions=[prediction],
                                model_version="m")
        assert server.import_tasks(project, tasks) == 1
        stored = server.tasks(project)[0]["id"]
        server.annotate(stored, result_for(task, labels))
        exported = server.export(project)
        predicted = server.call("GET", f"/api/predictions?task={stored}")
        assert [p["result"] for p in predicted] == [tasks[0]["predictions"][0]["result"]]
        found = read_export(task, exported)
        assert found.problems == [] and found.labels == {os.path.realpath(image): sorted(labels)}


def _png() -> bytes:
    import cv2
    import numpy as np

    return cv2.imencode(".png", np.full((8, 8, 3), 200, np.uint8))[1].tobytes()
