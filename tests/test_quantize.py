"""Static int8 quantization behind the accuracy gate, and BatchNorm folding of the exported graph."""

import collections
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.conftest import add_task, edit_task, write_registry
from tests.test_export_runtime import NO_TORCH, distinct_task_norms
from waterdrop import mixed_precision
from waterdrop.config import load_registry
from waterdrop.contract import METADATA_KEY
from waterdrop.export import export_onnx
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.quantize import QUANTIZED_OPS, prepare, quantize, quantize_file
from waterdrop.runtime import Predictor
from waterdrop.scoring import TaskData, calibration_images, load_config, read_labeled, task_data_from_config

REPO = Path(__file__).resolve().parents[1]
GRADES = ["blurry", "soft", "sharp"]


def _grades(root: Path) -> Path:
    """A folder per grade for val and test: noise blurred less for higher grades."""
    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        for grade, sigma in zip(GRADES, (3.0, 1.2, 0.0)):
            (root / split / grade).mkdir(parents=True)
            for i in range(4):
                image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
                cv2.imwrite(str(root / split / grade / f"{i}.png"), cv2.GaussianBlur(image, (0, 0), sigma)
                            if sigma else image)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_root) -> tuple[Path, Path]:
    """Every kind of task (binary with a cascade, multi-label with loss prediction, graded), each
    with a test split; test_resnet at 64 px with per-task BatchNorm in levels 2 and 4 (level 3
    between them shared, but run once per task). Returns (registry, model file)."""
    folder = tmp_path_factory.mktemp("quantize")
    registry = write_registry(folder, demo_root, task_bn_stages=[2, 4])
    for name in ("disgusting", "thriller", "scene_tags"):
        edit_task(registry, name, data={"test": str(demo_root / name / "test.jsonl")})
    edit_task(registry, "thriller", cascade={"backbone": "test_resnet", "hard_per_batch": 2})
    edit_task(registry, "scene_tags", loss_prediction={"hidden": 8})
    grades = _grades(folder / "sharpness")
    add_task(registry, {"name": "sharpness", "head": {"type": "GradedHead"}, "labels": GRADES,
                        "data": {"train": str(grades / "val"), "val": str(grades / "val"),
                                 "test": str(grades / "test")}})
    cfg = load_registry(registry)
    torch.manual_seed(0)
    net = MultiTaskNet(cfg).eval()
    distinct_task_norms(net)
    thresholds = {"disgusting": 0.5, "thriller": 0.5, "scene_tags": dict.fromkeys(cfg.tasks[2].labels, 0.5),
                  "sharpness": None}
    export_onnx(net, cfg, thresholds, folder / "model.onnx")
    export_onnx(net, cfg, thresholds, folder / "model_cam.onnx", cam=True)  # the same net, with its maps
    return registry, folder / "model.onnx"


def _metadata(path: Path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA_KEY])


def _optimized_ops(path: Path, tmp_path: Path) -> collections.Counter:
    """Operator counts of onnxruntime's optimised graph. The extended level leaves out the NCHWc
    layout pass, which would turn an unfolded BatchNorm into a 1x1 convolution and hide it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def test_int8_file_is_served_and_records_precision_drops_and_thresholds(exported, demo_root, tmp_path):
    registry, model = exported
    tasks = task_data_from_config(load_config(registry), Predictor(model).tasks)
    out = tmp_path / "model.int8.onnx"
    record = quantize(model, out, [demo_root / "disgusting" / "train"], tasks, max_drop=1.0, calibration_count=8)
    assert record["written"] and not record["failures"] and out.is_file()
    meta = _metadata(out)
    assert meta["precision"] == "int8" and meta["quantization"]["calibration"]["images"] == 8
    measured = meta["quantization"]["tasks"]
    assert {name: measured[name]["metric"] for name in measured} == {
        "disgusting": "ap", "thriller": "ap", "scene_tags": "map", "sharpness": "boundary_ap"}
    for entry in measured.values():
        assert entry["split"] == "test" and entry["drop"] == pytest.approx(entry["fp32"] - entry["int8"])
    tasks_meta = {t["name"]: t for t in meta["tasks"]}
    for name, key in (("disgusting", "threshold"), ("thriller", "threshold"), ("scene_tags", "thresholds")):
        chosen = measured[name]["thresholds"]
        assert chosen["chosen_on"] == "val" and tasks_meta[name][key] == chosen["int8"]
        assert chosen["fp32"] == (0.5 if key == "threshold" else dict.fromkeys(chosen["fp32"], 0.5))
    assert measured["sharpness"]["thresholds"] is None
    # The runtime serves the file as it is, predicted loss included; the cascade decides in the
    # graph at the int8 threshold.
    images = sorted((demo_root / "thriller" / "val").glob("*.jpg"))[:4]
    results = list(Predictor(out).predict_paths(images))
    assert all(set(r["tasks"]) == {"disgusting", "thriller", "scene_tags", "sharpness"} for r in results)
    assert all(isinstance(r["tasks"]["scene_tags"]["predicted_loss"], float) for r in results)
    threshold = tasks_meta["thriller"]["threshold"]
    assert threshold != 0.5
    session = Predictor(out).session
    batch = np.random.default_rng(0).integers(0, 256, (8, 3, 64, 64)).astype(np.float32)
    prob, decision = session.run(["thriller.prob", "thriller.decision"], {"image": batch})
    np.testing.assert_array_equal(decision, prob >= np.float32(threshold))
    assert _optimized_ops(out, tmp_path)["BatchNormalization"] == 0


def test_gate_refuses_then_force_writes_without_torch(exported, demo_root, tmp_path):
    _, model = exported
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for source in sorted((demo_root / "scene_tags" / "train").glob("*.jpg"))[:4]:
        (calibration / source.name).write_bytes(source.read_bytes())
    (calibration / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    (calibration / "empty.png").write_bytes(b"")
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(NO_TORCH)
    out = tmp_path / "model.int8.onnx"
    data = {"disgusting": demo_root / "disgusting" / "test.jsonl", "thriller": demo_root / "thriller" / "val.jsonl",
            "scene_tags": demo_root / "scene_tags" / "test.jsonl", "sharpness": model.parent / "sharpness" / "test"}
    command = [sys.executable, str(REPO / "tools" / "quantize.py"), str(model), "-o", str(out), "--calibration",
               str(calibration), *[f"--eval={name}={path}" for name, path in data.items()]]
    env = {"PYTHONPATH": f"{tmp_path / 'blocker'}:{REPO}", "PATH": "/usr/bin:/bin"}
    refused = subprocess.run([*command, "--max-ap-drop", "-1", "--max-fp32-activations", "2"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1, refused.stderr
    assert not out.exists()
    assert "no file with at most 2 activations in fp32 passed" in refused.stdout
    assert "refused: disgusting: ap" in refused.stderr and "the budget is -1.0" in refused.stderr
    assert "NOT written" in refused.stderr and "int8 maps" not in refused.stdout  # this file has no maps
    assert "what now:" in refused.stderr and "--calibration-images 512" in refused.stderr
    # The same net with its maps: forced through, and the maps' agreement is printed.
    command[2] = str(model.with_name("model_cam.onnx"))
    forced = subprocess.run([*command, "--max-ap-drop", "-1", "--force", "--max-fp32-activations", "0"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert forced.returncode == 1, forced.stderr  # written, with two undecodable calibration images
    assert "2 image(s) could not be decoded" in forced.stderr
    assert "scene_tags.cam: int8 maps vs fp32 on 40 maps: correlation" in forced.stdout
    record = _metadata(out)["quantization"]
    assert record["forced"] and record["max_drop"] == -1.0
    assert record["calibration"]["images"] == 4 and record["calibration"]["undecodable"] == 2
    assert record["tasks"]["thriller"]["split"] == "given"
    assert record["tasks"]["disgusting"]["thresholds"]["chosen_on"].startswith("kept")


def test_undecodable_calibration_images_are_counted_and_skipped(demo_root, tmp_path):
    (tmp_path / "bad.jpg").write_text("not an image")
    good = sorted((demo_root / "disgusting" / "val").glob("*.jpg"))[:3]
    (tmp_path / "images.jsonl").write_text("\n".join(json.dumps({"image": str(p), "labels": []}) for p in good))
    images, bad = calibration_images([tmp_path / "images.jsonl", tmp_path / "bad.jpg"], 10, 32)
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.uint8
    assert len(bad) == 1 and "bad.jpg" in bad[0]


def test_labels_must_agree_and_graded_truth_is_the_grade_index(exported):
    registry, model = exported
    entries = Predictor(model).tasks
    cfg = load_config(registry)
    cfg.tasks[1].labels = list(reversed(cfg.tasks[1].labels))
    with pytest.raises(ValueError, match="task thriller: the model's labels"):
        task_data_from_config(cfg, entries)
    paths, truth = read_labeled(model.parent / "sharpness" / "test", entries[3])
    # Folders in name order: blurry (grade 0), sharp (2), soft (1).
    assert [p.parent.name for p in paths[::4]] == ["blurry", "sharp", "soft"]
    assert truth[:, 0].tolist() == [0] * 4 + [2] * 4 + [1] * 4


def test_branched_batchnorms_fold_into_their_convolutions(exported, tmp_path):
    """onnxruntime's optimised fp32 graph keeps no BatchNormalization node. (On this model the
    stacked batch kept all 18 branched ones; without a convolution of their own, the 6 after the
    two convolutions that every task's copy of level 2 applies to the shared input stayed.)"""
    _, model = exported
    assert _optimized_ops(model, tmp_path)["BatchNormalization"] == 0


def test_the_maps_of_an_int8_file_are_compared_with_the_fp32_maps(exported, demo_root, tmp_path):
    registry, model = exported
    with_cams = model.with_name("model_cam.onnx")
    tasks = task_data_from_config(load_config(registry), Predictor(with_cams).tasks)
    out = tmp_path / "cam.int8.onnx"
    record = quantize(with_cams, out, [demo_root / "disgusting" / "train"], tasks, max_drop=1.0, calibration_count=8,
                      batch_size=3)  # the maps are compared in batches of 3, 3 and 2
    assert set(record["cams"]) == set(Predictor(with_cams).cam_outputs.values())
    # 8 images; scene_tags draws one map per tag
    assert record["cams"]["scene_tags.cam"]["maps"] == 8 * len(load_config(registry).tasks[2].labels)
    for agreement in record["cams"].values():
        assert 0 <= agreement["drawn_mean_abs_difference"] < 0.5
        assert agreement["correlation"] > 0.5  # None only for a constant map; at 64 px each map is 2 x 2 and varies
    assert _metadata(out)["quantization"]["cams"] == record["cams"]
    int8 = Predictor(out)
    _, maps = int8.explain_batch(*int8._prepared([np.zeros((64, 64, 3), np.uint8)]))
    assert set(maps[0]) == set(Predictor(with_cams).cam_outputs)
    assert "cams" not in quantize(model, tmp_path / "plain.int8.onnx", [demo_root / "disgusting" / "train"], tasks,
                                  max_drop=1.0, calibration_count=8)


def test_the_fewest_activations_are_kept_in_fp32():
    """Growing steps find a passing count, a bisection the fewest below it."""
    ranked = [f"a{i}" for i in range(30)]
    asked = []

    def passes(kept: list[str]) -> bool:
        asked.append(len(kept))
        return "a6" in kept  # the 7th most sensitive decides

    kept, tried = mixed_precision.fewest_in_fp32(ranked, passes, limit=30)
    assert kept == ranked[:7] and tried == asked
    assert tried[:6] == [1, 2, 3, 4, 6, 8] and tried[-1] == 7
    assert mixed_precision.fewest_in_fp32(ranked, passes, limit=5) == (None, [1, 2, 3, 4, 5])
    assert mixed_precision.steps(0) == [] and mixed_precision.steps(1) == [1]


def test_activations_kept_fp32_skip_quantization_and_come_closer_to_fp32(exported, demo_root, tmp_path):
    _, model = exported
    images, _ = calibration_images([demo_root / "disgusting" / "train", demo_root / "scene_tags" / "train"], 16, 64)
    int8_path = tmp_path / "all.int8.onnx"
    quantize_file(model, int8_path, images)
    all_int8, fp32 = onnx.load(str(int8_path)), onnx.load(str(prepare(model, tmp_path / "prepared.onnx")))
    activations = mixed_precision.quantized_activations(all_int8)
    assert len(activations) > 10 and len(set(activations)) == len(activations)
    outputs = {t["name"]: t["outputs"]["prob"] for t in Predictor(model).tasks}
    ranked = mixed_precision.rank_activations(all_int8, fp32, images, outputs, ["disgusting", "scene_tags"],
                                              QUANTIZED_OPS)
    assert sorted(entry["activation"] for entry in ranked) == sorted(activations)
    assert [entry["gain"] for entry in ranked] == sorted((entry["gain"] for entry in ranked), reverse=True)
    kept = mixed_precision.keep_fp32(all_int8, fp32, activations)
    # Every node now computes in fp32, so every weight is its fp32 original again: no Q/DQ left,
    # and the Clip/Relu that quantization had taken over are back.
    ops = collections.Counter(node.op_type for node in kept.graph.node)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0
    assert ops["Conv"] == collections.Counter(node.op_type for node in all_int8.graph.node)["Conv"]
    assert ops["Relu"] == collections.Counter(node.op_type for node in fp32.graph.node)["Relu"] > 0
    reference = {name: ort.InferenceSession(str(model)).run([name], {"image": images.astype(np.float32)})[0]
                 for name in outputs.values()}
    session = mixed_precision._session
    far = mixed_precision.task_distances(session(all_int8), images, outputs, reference)
    near = mixed_precision.task_distances(session(kept), images, outputs, reference)
    assert all(near[task] < 1e-4 < far[task] for task in outputs), (near, far)
    nodes = mixed_precision.fp32_nodes(all_int8, activations[:1], QUANTIZED_OPS)
    assert nodes and {node["op"] for node in nodes} <= set(QUANTIZED_OPS)
    with pytest.raises(ValueError, match="not quantized activations"):
        mixed_precision.keep_fp32(all_int8, fp32, ["no such tensor"])
    # A file with class activation maps: a map that leaves the graph through a DequantizeLinear
    # keeps it, whatever is kept in fp32.
    cams = model.with_name("model_cam.onnx")
    quantize_file(cams, tmp_path / "cam.int8.onnx", images)
    cam_int8, cam_fp32 = onnx.load(str(tmp_path / "cam.int8.onnx")), onnx.load(str(prepare(cams, tmp_path / "c.onnx")))
    for kept_one in mixed_precision.quantized_activations(cam_int8)[::7]:
        mixed_precision._session(mixed_precision.keep_fp32(cam_int8, cam_fp32, [kept_one]))


def test_the_gate_keeps_sensitive_activations_in_fp32_until_every_task_passes(exported, demo_root, tmp_path):
    """A budget the all-int8 file misses: the search keeps activations in fp32 until every task
    passes on val, and the record names them; the test split then judges that file once."""
    registry, model = exported
    tasks = task_data_from_config(load_config(registry), Predictor(model).tasks)
    calibration = [demo_root / "disgusting" / "train", demo_root / "scene_tags" / "train"]
    probe = quantize(model, tmp_path / "probe.int8.onnx", calibration, tasks, max_drop=1.0, calibration_count=16,
                     max_fp32=0)
    worst = max(task["val"]["drop"] for task in probe["tasks"].values())
    assert worst > 0.005, probe["tasks"]  # this untrained net loses AP in int8: the search has work to do
    # Searched and judged on the same split (as with --eval): the file found is the file written.
    on_val = {name: TaskData(name, data.val, "val", data.val, data.config) for name, data in tasks.items()}
    out = tmp_path / "mixed.int8.onnx"
    record = quantize(model, out, calibration, on_val, max_drop=worst / 2, calibration_count=16)
    mixed = record["mixed_precision"]
    assert record["written"] and not record["failures"], record["failures"]
    assert mixed["all_int8_over_budget"]["val"] and mixed["kept_fp32"] and mixed["nodes_fp32"]
    assert "no held-out check" in mixed["chosen_on"]
    # The search saw val alone: no trial's test drops were measured, let alone recorded.
    assert all(set(drops) == {"val"} for step in mixed["tried"] for drops in step["drops"].values())
    assert all(task["drop"] <= worst / 2 for task in record["tasks"].values())
    assert {node["op"] for node in mixed["nodes_fp32"]} <= set(QUANTIZED_OPS)
    counts = [step["fp32_activations"] for step in mixed["tried"]]
    assert len(mixed["kept_fp32"]) in counts and not next(
        step for step in mixed["tried"] if step["fp32_activations"] == len(mixed["kept_fp32"]))["over_budget"]
    assert all(step["over_budget"] for step in mixed["tried"] if step["fp32_activations"] < len(mixed["kept_fp32"]))
    written = onnx.load(str(out))
    assert not set(mixed["kept_fp32"]) & set(mixed_precision.quantized_activations(written))
    assert _metadata(out)["quantization"]["mixed_precision"]["kept_fp32"] == mixed["kept_fp32"]
    assert record["speed"]["images_per_s"]["int8"] > 0
    # Chosen on val, judged on test: written exactly when every test drop is within the budget.
    held_out = quantize(model, tmp_path / "held_out.int8.onnx", calibration, tasks, max_drop=worst / 2,
                        calibration_count=16)
    assert held_out["mixed_precision"]["chosen_on"] == "each task's val split"
    assert held_out["mixed_precision"]["kept_fp32"]
    assert all(task["val"]["drop"] <= worst / 2 for task in held_out["tasks"].values())
    within = all(task["drop"] <= worst / 2 for task in held_out["tasks"].values())
    assert held_out["written"] == within == (tmp_path / "held_out.int8.onnx").exists()
    assert within or any("on its test split" in failure for failure in held_out["failures"])
    # A budget nothing meets is refused after --max-fp32-activations: see the CLI test above.
