"""ONNX export (all outputs, dynamic batch, metadata, parity) and the torch-free runtime."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from tests.conftest import bad_input_corpus, edit_task, huge_png, write_registry
from waterdrop.config import load_registry
from waterdrop.contract import METADATA_KEY
from waterdrop.export import DeployGraph, check_parity, export_onnx
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.model.task_bn import TaskBatchNorm

REPO = Path(__file__).resolve().parents[1]
# A sitecustomize.py that makes torch unimportable in a subprocess (the runtime install has none).
NO_TORCH = ("import sys\n"
            "class _NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch is blocked in this test')\n"
            "sys.meta_path.insert(0, _NoTorch())\n")
THRESHOLDS = {"disgusting": 0.4, "thriller": 0.3, "scene_tags": {t: 0.5 for t in
                                                ["sky", "cloud", "grass", "water", "boat", "tree", "forest",
                                                 "building", "glasses", "ball"]}}


def distinct_task_norms(net: MultiTaskNet) -> None:
    """Make every task's BatchNorm copies differ, as training does (untrained copies are equal:
    a task routed through the wrong copy would go unnoticed, and the exporter merges equal ones)."""
    with torch.no_grad():
        for module in net.modules():
            for norm in module.branches if isinstance(module, TaskBatchNorm) else []:
                norm.running_mean.add_(0.1 * torch.randn_like(norm.running_mean))
                norm.running_var.mul_(1 + torch.rand_like(norm.running_var))
                norm.weight.mul_(1 + 0.1 * torch.randn_like(norm.weight))
                norm.bias.add_(0.1 * torch.randn_like(norm.bias))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_root):
    folder = tmp_path_factory.mktemp("export")
    registry = write_registry(folder, demo_root)
    # Export every deploy feature: PCB parts on disgusting, an OHEM cascade on thriller, loss
    # prediction on scene_tags.
    for name, change in (("disgusting", {"head": {"type": "BinaryHead", "pcb": {"size": 1, "stride": 1}}}),
                         ("thriller", {"cascade": {"backbone": "test_resnet", "hard_per_batch": 2}}),
                         ("scene_tags", {"loss_prediction": {"hidden": 16}})):
        task_file = folder / "tasks" / f"{name}.yaml"
        task_file.write_text(yaml.safe_dump({**yaml.safe_load(task_file.read_text()), **change}))
    cfg = load_registry(registry)
    torch.manual_seed(0)
    net = MultiTaskNet(cfg).eval()
    path = folder / "model.onnx"
    parity = export_onnx(net, cfg, THRESHOLDS, path)
    return net, cfg, path, parity


def test_every_output_matches_pytorch_at_two_batch_sizes(exported):
    net, cfg, path, parity = exported
    assert set(parity) == {"disgusting.prob", "disgusting.subclass_prob", "thriller.prob", "thriller.subclass_prob",
                           "thriller.stage1_prob", "thriller.stage2_prob", "thriller.decision", "scene_tags.prob",
                           "scene_tags.tag_prob", "scene_tags.det_boxes", "scene_tags.det_scores",
                           "scene_tags.predicted_loss", "embedding"}
    assert max(parity.values()) <= 1e-4
    graph = DeployGraph(net, THRESHOLDS).eval()
    assert check_parity(path, graph, cfg.model.input_size, batch_sizes=(5,)) == pytest.approx(
        {k: 0.0 for k in parity}, abs=1e-4)


def test_export_runs_each_task_unstacked_with_the_stacked_outputs(tmp_path, demo_root):
    """What the export traces (each task's levels from the first branched one run on the batch
    itself, through that task's BatchNorms) gives every output of the stacked batch."""
    registry = write_registry(tmp_path, demo_root, task_bn_stages=[2, 4])
    edit_task(registry, "thriller", cascade={"backbone": "test_resnet", "hard_per_batch": 2})
    edit_task(registry, "scene_tags", loss_prediction={"hidden": 8})
    torch.manual_seed(0)
    net = MultiTaskNet(load_registry(registry)).eval()
    distinct_task_norms(net)
    images = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        stacked = net.forward_all(images, embedding=True)
        per_task = net.forward_all(images, stack_tasks=False, embedding=True)
    assert list(per_task) == list(stacked) and "scene_tags.predicted_loss" in stacked and "embedding" in stacked
    for name, value in stacked.items():
        torch.testing.assert_close(per_task[name], value, atol=1e-5, rtol=1e-5)
    assert net.routing.task_index is None


def test_cascade_decision_is_the_and_of_both_networks(exported):
    net, _, path, _ = exported
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(1).integers(0, 256, (6, 3, 64, 64)).astype(np.float32)
    names = ["thriller.stage1_prob", "thriller.stage2_prob", "thriller.prob", "thriller.decision"]
    first, second, prob, decision = session.run(names, {"image": image})
    assert decision.dtype == bool
    np.testing.assert_allclose(prob, np.minimum(first, second), atol=1e-6)
    np.testing.assert_array_equal(decision, (first >= 0.3) & (second >= 0.3))


def test_file_is_single_self_describing_and_batch_is_dynamic(exported):
    _, cfg, path, _ = exported
    assert not Path(str(path) + ".data").exists()
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    assert meta["input"]["size"] == 64 and meta["input"]["color"] == "RGB"
    tasks = {t["name"]: t for t in meta["tasks"]}
    assert tasks["disgusting"]["threshold"] == 0.4
    assert tasks["disgusting"]["labels"][0] == "insects"
    assert tasks["scene_tags"]["outputs"]["det_boxes"] == "scene_tags.det_boxes"
    assert tasks["scene_tags"]["detector"]["classes"] == ["glasses", "ball"]
    assert tasks["scene_tags"]["relations"]["implies"]["forest"] == ["tree"]
    assert tasks["scene_tags"]["outputs"]["predicted_loss"] == "scene_tags.predicted_loss"
    assert tasks["scene_tags"]["loss_prediction"]["levels"] == [1, 2, 3, 4]
    assert "predicted_loss" not in tasks["disgusting"]["outputs"] and "loss_prediction" not in tasks["disgusting"]
    assert tasks["thriller"]["outputs"]["decision"] == "thriller.decision" and "AND" not in tasks["thriller"]["cascade"]
    assert "stage2_prob >= threshold" in tasks["thriller"]["cascade"]["rule"]


def test_a_model_exported_under_another_resize_rule_is_flagged(exported, tmp_path):
    import warnings

    from waterdrop.runtime import Predictor

    _, _, path, _ = exported
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Predictor(path)  # exported here: the same rule, no warning
    model = onnx.load(str(path))
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(prop.value)
    meta["input"]["resize"] = "stretch to size x size"  # what files said before the area rule
    prop.value = json.dumps(meta)
    onnx.save(model, str(tmp_path / "older.onnx"))
    with pytest.warns(UserWarning, match="another rule.*'stretch to size x size'"):
        Predictor(tmp_path / "older.onnx")


def test_runtime_matches_torch_on_real_images(exported, demo_root):
    from waterdrop.imageio import read_image, to_model_input
    from waterdrop.runtime import Predictor

    net, cfg, path, _ = exported
    files = sorted((demo_root / "disgusting" / "val").glob("*.jpg"))[:3]
    results = list(Predictor(path).predict_paths(files))
    with torch.no_grad():
        # The runtime decodes a JPEG at the smallest DCT scale that keeps the input size (64 of 128 px).
        expected = net.forward_all(torch.from_numpy(to_model_input([read_image(f, 64) for f in files], 64)))
    for row, result in enumerate(results):
        disgusting = result["tasks"]["disgusting"]
        assert disgusting["score"] == pytest.approx(float(expected["disgusting.prob"][row]), abs=1e-4)
        assert disgusting["positive"] == (disgusting["score"] >= 0.4)
        thriller = result["tasks"]["thriller"]
        assert thriller["positive"] == (min(thriller["stage_scores"]) >= 0.3)
        tags = result["tasks"]["scene_tags"]
        assert tags["predicted_loss"] == pytest.approx(float(expected["scene_tags.predicted_loss"][row]), abs=1e-4)
        assert "predicted_loss" not in disgusting
        scores = np.array([list(tags["scores"].values())])
        after = cfg.tasks[-1].relations.apply(scores, scores >= 0.5)[0]
        assert tags["tags"] == [k for k, keep in zip(tags["scores"], after) if keep]
        for found in tags["objects"]:
            assert found["label"] in ("glasses", "ball") and found["score"] >= 0.3
            x1, y1, x2, y2 = found["box"]
            assert 0 <= x1 <= x2 <= 128 and 0 <= y1 <= y2 <= 128  # pixels of the 128 px demo image


def test_predict_cli_runs_without_torch_and_reports_bad_images(exported, demo_root, tmp_path):
    """torch is made unimportable; predict.py must still score images and report the bad one."""
    net, _, path, _ = exported
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TORCH)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    huge = huge_png(tmp_path / "huge.png")
    good = sorted((demo_root / "scene_tags" / "val").glob("*.jpg"))[:2]
    env = {"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin"}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr
    done = subprocess.run([sys.executable, str(REPO / "tools" / "predict.py"), str(path), str(good[0]), str(bad),
                           str(huge), str(good[1])], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # done, two images could not be decoded
    assert "2 of 4 image(s) could not be decoded" in done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(x["image"]).name for x in lines] == [good[0].name, "bad.jpg", "huge.png", good[1].name]
    assert "error" in lines[1] and "tasks" in lines[0] and "tasks" in lines[3]
    assert "30000 x 30000 pixels is over the limit" in lines[2]["error"]
    assert set(lines[0]["tasks"]) == {"disgusting", "thriller", "scene_tags"}
    # The torch-free tool gives PyTorch's numbers for the image.
    from waterdrop.imageio import read_image, to_model_input

    with torch.no_grad():
        expected = net.forward_all(torch.from_numpy(to_model_input([read_image(good[0], 64)], 64)))  # as it decodes
    tasks = lines[0]["tasks"]
    assert tasks["disgusting"]["score"] == pytest.approx(float(expected["disgusting.prob"][0]), abs=1e-4)
    assert isinstance(tasks["scene_tags"]["predicted_loss"], float)
    assert tasks["scene_tags"]["predicted_loss"] == pytest.approx(float(expected["scene_tags.predicted_loss"][0]),
                                                                  abs=1e-4)


def test_predict_and_scan_exit_codes_and_wrong_kinds_of_file(exported, demo_root, tmp_path):
    _, _, path, _ = exported
    image = sorted((demo_root / "disgusting" / "val").glob("*.jpg"))[0]

    def run(tool, *args):
        return subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], capture_output=True,
                              text=True, timeout=120)

    done = run("predict.py", path, image)
    assert done.returncode == 0 and json.loads(done.stdout)["tasks"]["scene_tags"]["thresholds"]
    assert "predict  1 images" in done.stderr  # the closing progress line
    done = run("predict.py", path, image, "--quiet")
    assert done.returncode == 0 and done.stderr == "" and json.loads(done.stdout)["tasks"]
    done = run("predict.py", path, tmp_path / "no_such.jpg")
    assert done.returncode == 2 and "no such image or folder: " in done.stderr and not done.stdout
    for model, what in ((image, "a JPEG image"), (tmp_path, "is a folder")):
        for tool, args in (("predict.py", [image]), ("scan.py", [image.parent, "--out", tmp_path / "scan"])):
            done = run(tool, model, *args)
            assert done.returncode == 2 and what in done.stderr, (tool, done.stderr)
            assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    done = run("predict.py", text, image)
    assert done.returncode == 2 and "not an ONNX model file onnxruntime can load" in done.stderr
    assert "Traceback" not in done.stderr
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    done = run("predict.py", path, corrupt)
    assert done.returncode == 1 and "error" in json.loads(done.stdout)


def test_predict_gives_one_error_line_per_bad_file_and_goes_on(exported, tmp_path):
    _, _, path, _ = exported
    good, bad = bad_input_corpus(tmp_path / "odd")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "predict.py"), str(path), *map(str, good + bad)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = {Path(x["image"]).name: x for x in map(json.loads, done.stdout.splitlines())}
    assert set(lines) == {p.name for p in good + bad}
    assert all("tasks" in lines[p.name] for p in good)
    assert all("error" in lines[p.name] and "tasks" not in lines[p.name] for p in bad)


def test_a_trunk_with_its_head_convolution_exports_with_parity(tmp_path, demo_root):
    cfg = load_registry(write_registry(tmp_path, demo_root, backbone="test_efficientnet", head_conv=True))
    torch.manual_seed(0)
    net = MultiTaskNet(cfg).eval()
    distinct_task_norms(net)  # the head convolution's norm is per task too
    assert net.channels[-1] == 256
    parity = export_onnx(net, cfg, THRESHOLDS, tmp_path / "model.onnx")
    assert "embedding" in parity and max(parity.values()) <= 1e-4
