"""tools/compare.py: a candidate against the deployed model, task by task, and the gate."""

import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
import torch
import yaml

from tests.conftest import bad_input_corpus, edit_task, write_registry
from tests.test_end_to_end import REPO
from tests.test_export_runtime import NO_TORCH
from waterdrop.config import load_registry
from waterdrop.contract import METADATA_KEY, metadata, task_entry
from waterdrop.engine.checkpoint import best_checkpoint, load_net
from waterdrop.engine.train import run_training
from waterdrop.export import export_onnx
from waterdrop.kinds import kind_of
from waterdrop.release.compare import Model, compare, decision_flips, paired_interval
from waterdrop.release.repository import triton_config
from waterdrop.runtime import Predictor
from waterdrop.scoring import decode_labeled


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_root):
    """A trained model and a copy whose thriller head is turned upside down (its scores reversed):
    the better of the two on thriller's split is the deployed one, the other the candidate."""
    folder = tmp_path_factory.mktemp("release")
    registry = write_registry(folder, demo_root)
    for name in ("thriller", "scene_tags"):  # disgusting keeps no test split: compared on val
        edit_task(registry, name, data={"test": str(demo_root / name / "val.jsonl")})
    run = folder / "run"
    run_training(registry, run, printer=lambda *a, **k: None)
    net, cfg, meta = load_net(best_checkpoint(run))
    thresholds = json.loads((run / "eval" / "thresholds.json").read_text())
    export_onnx(net, cfg, thresholds, run / "model.onnx", lineage=meta.get("lineage"))
    with torch.no_grad():
        for param in net.heads["thriller"].parameters():
            param.neg_()
    export_onnx(net, cfg, thresholds, folder / "reversed.onnx")
    aps = {}
    for path in (run / "model.onnx", folder / "reversed.onnx"):
        predictor = Predictor(path)
        entry = next(t for t in predictor.tasks if t["name"] == "thriller")
        scores, truth = decode_labeled(demo_root / "thriller" / "val.jsonl", entry, predictor.size).scores(predictor,
                                                                                                          entry)
        aps[path] = kind_of("binary").validation_metrics(scores, truth)[1]
    deployed, candidate = sorted(aps, key=aps.get, reverse=True)
    shutil.copy(deployed, folder / "deployed.onnx")
    shutil.copy(candidate, folder / "candidate.onnx")
    return registry, folder / "deployed.onnx", folder / "candidate.onnx"


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "compare.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)


def test_the_same_model_passes_unchanged_without_scoring(models, tmp_path):
    registry, deployed, _ = models
    record, arrays = compare(Model(deployed, Predictor(deployed)), Model(deployed, Predictor(deployed)),
                             load_registry(registry))
    assert {r["status"] for r in record["tasks"].values()} == {"unchanged"} and not arrays
    assert record["gate"] == "pass" and record["added"] == record["retired"] == []


def planted_model(path, reversed_on_marker: bool, task_hash: str, size: int = 32):
    """A hand-built ONNX model of one binary task, "bright": the score rises with the image's mean
    red. With ``reversed_on_marker`` the score is reversed on images whose mean green is above
    200: the planted negative flips."""
    from onnx import TensorProto, helper

    def channel_mean(channel: int, name: str) -> list:
        return [helper.make_node("Slice", ["image", f"c{channel}", f"c{channel + 1}", "axis1"], [f"{name}_slice"]),
                helper.make_node("ReduceMean", [f"{name}_slice"], [name], axes=[1, 2, 3], keepdims=0)]

    constants = {"c0": [0], "c1": [1], "c2": [2], "axis1": [1]}
    initializers = [helper.make_tensor(k, TensorProto.INT64, [1], v) for k, v in constants.items()]
    initializers += [helper.make_tensor(k, TensorProto.FLOAT, [], [v]) for k, v in
                     (("mid", 128.0), ("gain", 0.05), ("one", 1.0), ("marker_level", 200.0))]
    nodes = channel_mean(0, "red") + channel_mean(1, "green") + [
        helper.make_node("Sub", ["red", "mid"], ["centred"]), helper.make_node("Mul", ["centred", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score"])]
    if reversed_on_marker:
        nodes += [helper.make_node("Greater", ["green", "marker_level"], ["marked"]),
                  helper.make_node("Sub", ["one", "score"], ["reversed"]),
                  helper.make_node("Where", ["marked", "reversed", "score"], ["bright.prob"])]
    else:
        nodes.append(helper.make_node("Identity", ["score"], ["bright.prob"]))
    graph = helper.make_graph(nodes, "planted", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                                ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("bright.prob", TensorProto.FLOAT, ["N"])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    entry = task_entry("bright", kind_of("binary"), "BinaryHead", ["bright"], "dark", {"prob": "bright.prob"}, 0.5,
                       {"prevalence": 0.1, "recall": 0.9})
    entry["hash"] = task_hash
    prop = model.metadata_props.add()
    prop.key, prop.value = METADATA_KEY, json.dumps(metadata([entry], "planted", size, [0, 0, 0], [1, 1, 1], "test"))
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """60 images, 30 bright (10 of them marked green) and 30 dark; a registry of their task."""
    folder = tmp_path_factory.mktemp("planted")
    rng, lines = np.random.default_rng(0), []
    for i in range(60):
        bright, marked = i < 30, i < 10
        pixels = rng.integers(0, 20, (32, 32, 3)).astype(np.uint8)
        pixels[..., 2] += 200 if bright else 50  # OpenCV writes BGR: channel 2 is red
        pixels[..., 1] += 230 if marked else 100
        cv2.imwrite(str(folder / f"{i:02d}.png"), pixels)
        lines.append(json.dumps({"image": f"{i:02d}.png", "labels": ["bright"] if bright else []}))
    (folder / "split.jsonl").write_text("\n".join(lines) + "\n")
    task = {"name": "bright", "head": {"type": "BinaryHead"}, "labels": ["bright"], "negative_label": "dark",
            "data": {"train": "split.jsonl", "val": "split.jsonl", "test": "split.jsonl"},
            "deploy": {"prevalence": 0.1, "target": {"recall": 0.9}, "max_negative_flip_rate": 0.05}}
    (folder / "bright.yaml").write_text(yaml.safe_dump(task))
    (folder / "registry.yaml").write_text(yaml.safe_dump({"model": {"backbone": "test_resnet", "pretrained": None,
                                                                    "input_size": 32}, "tasks": ["bright.yaml"]}))
    return (folder / "registry.yaml", planted_model(folder / "deployed.onnx", False, "a"),
            planted_model(folder / "candidate.onnx", True, "b"), [folder / f"{i:02d}.png" for i in range(10)])


def test_planted_negative_flips_fail_the_gate_and_are_shown(planted, tmp_path):
    registry, deployed, candidate, marked = planted
    out = tmp_path / "report"
    done = _tool(deployed, candidate, "--registry", registry, "--out", out, "--bootstrap", "300")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "over budget: bright" in done.stderr
    result = json.loads((out / "compare.json").read_text())["tasks"]["bright"]
    flips = result["flips"]
    assert (flips["negative_flips"], flips["positive_flips"], flips["decisions"]) == (10, 0, 60)
    assert sorted(flips["negative_flip_images"]) == sorted(map(str, marked))
    assert result["deployed"] == 1.0 and result["candidate"] < 0.9
    low, high = result["difference_interval"]
    assert low <= result["difference"] <= high < -0.01
    assert len(result["problems"]) == 2 and result["threshold_drift"] == 0.0
    at = result["at_own_thresholds"]
    assert at["deployed"]["at_threshold"]["recall"] == 1.0 and at["candidate"]["at_threshold"]["recall"] == 2 / 3
    assert (out / "bright_negative_flips.png").stat().st_size > 0 and (out / "pr_curves.png").is_file()
    markdown = (out / "compare.md").read_text()
    assert "| bright | compared | test (60) | ap | 1.0000 |" in markdown and "**FAIL**" in markdown
    forced = _tool(deployed, candidate, "--registry", registry, "--out", tmp_path / "forced", "--bootstrap", "50",
                   "--force")
    assert forced.returncode == 0 and json.loads((tmp_path / "forced" / "compare.json").read_text())["forced"]
    same = _tool(deployed, deployed, "--registry", registry, "--out", tmp_path / "same")
    assert same.returncode == 0 and "unchanged" in (tmp_path / "same" / "compare.md").read_text()
    # Another input size: each model gets the images as it prepares them, and the report says so.
    larger = planted_model(tmp_path / "larger.onnx", False, "c", size=40)
    record, _ = compare(Model(deployed, Predictor(deployed)), Model(larger, Predictor(larger)),
                        load_registry(registry), rounds=50)
    assert any("deployed 32 px, candidate 40 px" in note for note in record["notes"])
    assert record["tasks"]["bright"]["flips"]["negative_flips"] == 0 and record["gate"] == "pass"


def test_an_exported_candidate_reports_unchanged_tasks_by_hash(models, tmp_path):
    registry, deployed, candidate = models
    record, arrays = compare(Model(deployed, Predictor(deployed)), Model(candidate, Predictor(candidate)),
                             load_registry(registry), rounds=50)
    tasks = record["tasks"]
    assert tasks["disgusting"]["status"] == tasks["scene_tags"]["status"] == "unchanged"  # their hashes agree
    assert tasks["thriller"]["status"] == "compared" and set(arrays) == {"thriller"}
    assert tasks["thriller"]["split"] == "test" and tasks["thriller"]["images"] == 24


def test_changed_labels_preprocessing_bad_images_and_a_pool(models, demo_root, tmp_path):
    registry, deployed, candidate = models
    # A candidate with another input size, scene_tags' labels renamed and a new task's entry.
    model = onnx.load(str(candidate))
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(prop.value)
    scene = next(t for t in meta["tasks"] if t["name"] == "scene_tags")
    scene["labels"] = [label.upper() for label in scene["labels"]]
    scene.pop("relations", None)
    scene["hash"] = "changed"
    prop.value = json.dumps(meta)
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    # Undecodable images in disgusting's split are dropped for both models and counted.
    good, bad = bad_input_corpus(tmp_path / "odd")
    lines = (demo_root / "disgusting" / "val.jsonl").read_text().splitlines()
    lines = [json.dumps({**json.loads(x), "image": str(demo_root / "disgusting" / json.loads(x)["image"])})
             for x in lines]
    (tmp_path / "val.jsonl").write_text("\n".join(lines + [json.dumps({"image": str(p), "labels": ["normal"]})
                                                           for p in good + bad]) + "\n")
    edit_task(registry, "disgusting", data={"val": str(tmp_path / "val.jsonl")})
    try:
        meta_entry = next(t for t in meta["tasks"] if t["name"] == "disgusting")
        meta_entry["hash"] = "changed too"
        prop.value = json.dumps(meta)
        onnx.save(model, str(other))
        record, _ = compare(Model(deployed, Predictor(deployed)), Model(other, Predictor(other)),
                            load_registry(registry), rounds=50, pool=[demo_root / "thriller" / "val"], pool_size=20)
    finally:
        edit_task(registry, "disgusting", data={"val": str(demo_root / "disgusting" / "val.jsonl")})
    scene = record["tasks"]["scene_tags"]
    assert scene["status"] == "refused" and "labels or kind differ" in scene["why"]
    disgusting = record["tasks"]["disgusting"]
    assert disgusting["split"] == "val" and "no test split" in disgusting["split_note"]
    assert disgusting["undecodable"] == len(bad) and disgusting["images"] == len(lines) + len(good)
    pool = record["pool"]
    assert pool["sampled"] == 20 and set(pool["tasks"]) == {"disgusting", "thriller"}
    assert pool["tasks"]["thriller"]["changed"] > 0


def test_flips_and_intervals_on_planted_decisions():
    truth = np.array([1, 1, 0, 0, 1, -1])
    old = np.array([[1], [0], [0], [1], [1], [0]], dtype=bool)
    new = np.array([[0], [1], [0], [0], [1], [1]], dtype=bool)
    flips = decision_flips(old, new, truth, ["positive"])
    assert (flips["negative_flips"], flips["positive_flips"], flips["decisions"]) == (1, 2, 5)
    assert flips["negative_rows"] == [0]
    per_label = decision_flips(np.array([[1, 0], [1, 1]], bool), np.array([[0, 0], [1, 0]], bool),
                               np.array([[1, 0], [1, -1]]), ["a", "b"])
    assert per_label["per_label"]["a"]["negative_flips"] == 1 and per_label["per_label"]["b"]["decisions"] == 1
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    good = labels + rng.normal(0, 0.5, 400)
    same = paired_interval(kind_of("binary"), good, good, labels, rounds=200)
    assert same == (0.0, 0.0)
    worse = paired_interval(kind_of("binary"), good, rng.normal(0, 1, 400), labels, rounds=200)
    assert worse[1] < -0.2


def test_compare_runs_without_torch(models, tmp_path):
    registry, deployed, candidate = models
    (tmp_path / "sitecustomize.py").write_text(NO_TORCH)
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(REPO / "tools" / "compare.py"), str(deployed), str(deployed),
                           "--registry", str(registry), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gate: **PASS**" in (tmp_path / "out" / "compare.md").read_text()
    shutil.rmtree(tmp_path / "out")


def _release(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "release.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)


def test_a_release_is_a_triton_model_repository_behind_the_gate(planted, tmp_path):
    registry, deployed, candidate, _ = planted
    repository = tmp_path / "repo"
    first = _release(deployed, "--repository", repository, "--name", "quality", "--registry", registry)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (repository / "quality" / "1" / "model.onnx").is_file()
    refused = _release(candidate, "--repository", repository, "--name", "quality", "--registry", registry)
    assert refused.returncode == 1 and "not released: over budget: bright" in refused.stderr
    assert not (repository / "quality" / "2").exists()
    forced = _release(candidate, "--repository", repository, "--name", "quality", "--registry", registry, "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    version = repository / "quality" / "2"
    card = json.loads((version / "model_card.json").read_text())
    assert card["version"] == 2 and card["forced"] and card["gate"] == "fail"
    task = card["tasks"][0]
    assert task["threshold"] == 0.5 and task["release"]["verdict"] == "over budget"
    assert task["data"]["test"]["images"] == 60 and len(task["data"]["test"]["sha256"]) == 64
    assert {p.name for p in version.iterdir()} >= {"model.onnx", "model_card.md", "compare.md", "compare.json",
                                                    "resolved.json"}
    assert "overridden with --force" in (version / "model_card.md").read_text()
    # Triton's own schema reads the config back: the model, its batching, every tensor.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((repository / "quality" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("quality", "onnxruntime", 32)
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [
        ("image", "TYPE_FP32", [3, -1, -1])]
    # One score per image: dims [1] reshaped to the batch axis alone, as Triton requires.
    assert [(t.name, list(t.dims), list(t.reshape.shape), t.HasField("reshape")) for t in config.output] == [
        ("bright.prob", [1], [], True)]
    assert not [p for p in (repository / "quality").iterdir() if p.name.startswith(".")]  # no staging left


def test_the_triton_config_of_an_exported_model_lists_every_output(models):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    _, deployed, _ = models
    config = text_format.Parse(triton_config(deployed, "shared"), model_config_pb2.ModelConfig())
    session_outputs = Predictor(deployed).output_names
    assert [t.name for t in config.output] == session_outputs
    assert [list(t.dims) for t in config.input] == [[3, 64, 64]]
    kinds = {t.name: model_config_pb2.DataType.Name(t.data_type) for t in config.output}
    assert kinds["thriller.prob"] == "TYPE_FP32" and list(next(t for t in config.output
                                                               if t.name == "scene_tags.prob").dims) == [10]


def test_an_int8_or_rethresholded_file_is_scored_again_and_an_empty_pool_is_a_note(planted, tmp_path):
    registry, deployed, _, _ = planted
    model = onnx.load(str(deployed))
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(prop.value)
    meta["tasks"][0]["threshold"] = 0.9  # the same weights and hash, another threshold
    prop.value = json.dumps(meta)
    moved = tmp_path / "moved.onnx"
    onnx.save(model, str(moved))
    (tmp_path / "empty").mkdir()
    record, _ = compare(Model(deployed, Predictor(deployed)), Model(moved, Predictor(moved)), load_registry(registry),
                        rounds=50, pool=[tmp_path / "empty"], pool_size=10)
    bright = record["tasks"]["bright"]
    assert bright["status"] == "compared" and bright["threshold_drift"] == pytest.approx(0.4)
    assert bright["difference"] == 0.0 and bright["flips"]["positive_flips"] == 0
    assert any("the pool was not measured" in note for note in record["notes"])
