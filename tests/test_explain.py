"""Grad-CAM (waterdrop.explain), class activation maps in the graph (Head.cam) and in the ONNX
file, the overlays, tools/explain.py and tools/predict.py --cam."""

import collections
import copy
import json
import runpy
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import add_task, edit_task, write_registry
from tests.test_export_runtime import NO_TORCH
from waterdrop.config import config_to_dict, load_registry
from waterdrop.contract import METADATA_KEY
from waterdrop.explain import grad_cam, grad_cams, normalize_maps
from waterdrop.export import DeployGraph, export_onnx
from waterdrop.model.cbam import CBAM
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.model.task_bn import TaskBatchNorm
from waterdrop.overlay import UniqueStems, normalize_map, overlay, overlay_name
from waterdrop.registry import registered_heads
from waterdrop.runtime import Predictor

REPO = Path(__file__).resolve().parents[1]
TAGS = ["sky", "cloud", "grass", "water", "boat", "tree", "forest", "building", "glasses", "ball"]
THRESHOLDS = {"disgusting": 0.4, "thriller": 0.3, "scene_tags": dict.fromkeys(TAGS, 0.5), "sharpness": None}


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 64, 64), generator=torch.Generator().manual_seed(seed)).float()


def perturb_norms(net: MultiTaskNet, task_index: int) -> None:
    """Make one task's BatchNorm copies differ from the others' (untrained copies are equal, so a
    task routed through another task's copy would go unnoticed)."""
    generator = torch.Generator().manual_seed(task_index)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, TaskBatchNorm):
                norm = module.branches[task_index]
                norm.running_mean.add_(0.5 * torch.randn(norm.running_mean.shape, generator=generator))
                norm.weight.mul_(1 + 0.5 * torch.randn(norm.weight.shape, generator=generator))
                norm.bias.add_(0.5 * torch.randn(norm.bias.shape, generator=generator))


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_root):
    """Every kind of head, PCB on disgusting, a cascade on thriller, a graded task, CBAM after
    every level (blended in), per-task BatchNorm copies that differ."""
    folder = tmp_path_factory.mktemp("explain")
    registry = write_registry(folder, demo_root, cbam="stages")
    edit_task(registry, "disgusting", head={"pcb": {"size": 1, "stride": 1, "join_global": True}})
    edit_task(registry, "thriller", cascade={"backbone": "test_resnet", "hard_per_batch": 2})
    add_task(registry, {"name": "sharpness", "head": {"type": "GradedHead"}, "labels": ["blurry", "soft", "sharp"],
                        "data": {"train": str(folder / "none"), "val": str(folder / "none")}})
    cfg = load_registry(registry)
    torch.manual_seed(0)
    net = MultiTaskNet(cfg).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, CBAM):
                module.blend.fill_(0.5)
    for t in range(len(cfg.tasks)):
        perturb_norms(net, t)
    return net, cfg, folder


@pytest.fixture(scope="module")
def exported(built):
    """The file with the maps, and the same file as an export without them reads to the runtime:
    no map outputs (their nodes stay, unused) and no ``cam`` metadata."""
    net, cfg, folder = built
    with_cams, without = folder / "cams.onnx", folder / "plain.onnx"
    parity = export_onnx(net, cfg, THRESHOLDS, with_cams, cam=True)
    model = onnx.load(str(with_cams))
    kept = [o for o in model.graph.output if not o.name.endswith("cam")]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(entry.value)
    for task in meta["tasks"]:
        del task["cam"]
        task["outputs"] = {k: v for k, v in task["outputs"].items() if not k.endswith("cam")}
    entry.value = json.dumps(meta)
    onnx.save(model, str(without))
    return with_cams, without, parity


def _head(name: str, **args):
    labels = {"BinaryHead": ["a", "b", "c"], "MultiLabelHead": ["x", "y"], "GradedHead": ["low", "mid", "high"]}[name]
    head = registered_heads()[name]([8, 16], labels, "normal", **args).eval()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_()  # biases too: the maps must carry them
    return head


FEATS = [torch.randn(3, 8, 8, 8, generator=torch.Generator().manual_seed(1)),
         torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(2))]


@pytest.mark.parametrize("args", [{}, {"loss": "subclass_softmax"}, {"pcb": {"size": 4}},
                                  {"pcb": {"size": 4, "join_global": True}}])
def test_binary_class_maps_average_to_the_logits(args):
    """Global pooling, and PCB with one part covering the map: the spatial mean is the logits."""
    head = _head("BinaryHead", **args)
    with torch.no_grad():
        torch.testing.assert_close(head.class_maps(FEATS[-1]).mean(dim=(2, 3)), head(FEATS)["logits"])


def test_pcb_class_maps_pooled_as_the_parts_give_the_logits():
    """Several parts: the maps pooled in the parts' windows are the part logits, so their min
    (normal) and max (sub-classes) over the parts are the image's logits."""
    head = _head("BinaryHead", pcb={"size": 2, "stride": 1})
    with torch.no_grad():
        parts = F.avg_pool2d(head.class_maps(FEATS[-1]), 2, 1).flatten(2)
        pooled = torch.cat([parts[:, :1].amin(dim=2), parts[:, 1:].amax(dim=2)], dim=1)
        torch.testing.assert_close(pooled, head(FEATS)["logits"])


def test_cam_averages_to_the_decision_the_tag_logits_and_the_score():
    with torch.no_grad():
        plain = _head("BinaryHead", loss="softmax")
        logits = plain(FEATS)["logits"]
        torch.testing.assert_close(plain.cam(FEATS).mean(dim=(1, 2)), logits[:, 1] - logits[:, 0])
        tags = _head("MultiLabelHead")
        assert tags.cam(FEATS).shape == (3, 2, 4, 4)
        torch.testing.assert_close(tags.cam(FEATS).mean(dim=(2, 3)), tags(FEATS)["logits"])
        graded = _head("GradedHead")
        assert graded.cam(FEATS).shape == (3, 4, 4)
        torch.testing.assert_close(graded.cam(FEATS).mean(dim=(1, 2)), graded.target_score(graded(FEATS), None))
        # With sub-classes the positive map is the softmax-weighted sum of the sub-class maps.
        subclasses = _head("BinaryHead")
        maps, weights = subclasses.class_maps(FEATS[-1]), subclasses(FEATS)["logits"][:, 1:].softmax(dim=1)
        expected = (maps[:, 1:] * weights[:, :, None, None]).sum(dim=1) - maps[:, 0]
        torch.testing.assert_close(subclasses.cam(FEATS), expected)
        assert not torch.allclose(subclasses.cam(FEATS), maps[:, 1:].mean(dim=1) - maps[:, 0])


def structured(layer: torch.nn.Module, feature: torch.Tensor, seed: int = 0) -> None:
    """Random weights orthogonal to the mean feature vector, and no bias. An untrained trunk's
    deepest features are nearly the same everywhere, so its maps would be flat; these weights
    give maps with structure and both signs, which ReLU then cuts."""
    mean = feature.mean(dim=(0, 2, 3))
    weight = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.weight.copy_(weight - (weight @ mean)[:, None] * mean / mean.dot(mean))
        if layer.bias is not None:
            layer.bias.zero_()


def test_cam_is_grad_cam_for_a_global_pooling_linear_head(built):
    """Without the linear layer's bias (a constant in the map) the in-graph CAM is Grad-CAM on the
    deepest level up to scale: the same after ReLU and normalisation."""
    net = copy.deepcopy(built[0])
    batch = images(3)
    with torch.no_grad():
        per_task = net.features_per_task(batch)
    for task, layer in (("thriller", net.heads["thriller"].fc), ("scene_tags", net.heads["scene_tags"].fc),
                        ("sharpness", net.heads["sharpness"].score)):
        structured(layer, per_task[net.task_names.index(task)][-1])
    for task, target, column in (("thriller", None, None), ("scene_tags", "water", 3), ("sharpness", None, None)):
        with torch.no_grad():
            cam = net.heads[task].cam(per_task[net.task_names.index(task)])
        cam = cam if column is None else cam[:, column]
        assert (cam > 0).any() and (cam < 0).any()
        maps, _ = grad_cam(net, batch, task, target)
        assert maps.amax(dim=(1, 2)).tolist() == pytest.approx([1.0] * 3) and (maps == 0).any()
        torch.testing.assert_close(maps, normalize_maps(cam, (64, 64)), atol=1e-4, rtol=0)


def _manual_grad_cam(net, batch, task, feats):
    """Grad-CAM by hand from given feature maps (the deepest one weighted)."""
    leaf = feats[-1].detach().requires_grad_(True)
    with torch.enable_grad():
        logits = net.heads[task]([*feats[:-1], leaf])["logits"]
        score = logits[:, 1:].logsumexp(dim=1) - logits[:, 0]
        (gradient,) = torch.autograd.grad(score.sum(), leaf)
    raw = F.relu((gradient.mean(dim=(2, 3), keepdim=True) * leaf.detach()).sum(dim=1))
    maps = F.interpolate(raw[:, None], size=batch.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return maps / maps.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def test_grad_cam_goes_through_the_tasks_own_batchnorm_copies(built):
    net = copy.deepcopy(built[0])
    batch = images(2, seed=3)
    with torch.no_grad():
        per_task = net.features_per_task(batch)
    structured(net.heads["thriller"].fc, per_task[1][-1])
    net.train()  # grad_cam explains in eval mode and gives the mode back
    maps, scores = grad_cam(net, batch, "thriller")
    assert net.training
    net.eval()
    assert net.routing.task_index is None
    assert all(p.grad is None for p in net.parameters())
    torch.testing.assert_close(maps, _manual_grad_cam(net, batch, "thriller", per_task[1]), atol=1e-5, rtol=0)
    with torch.no_grad():
        logits = net.heads["thriller"](per_task[1])["logits"]
        torch.testing.assert_close(scores, logits[:, 1:].logsumexp(dim=1) - logits[:, 0])
    # Through disgusting's copies the same head sees other features and gives another map.
    other = _manual_grad_cam(net, batch, "thriller", per_task[0])
    assert (maps - other).abs().max() > 0.05


def test_cascade_stage_two_is_explained_by_the_second_network(built):
    net, _, _ = built
    batch = images(2, seed=4)
    cascade = net.features["cascade"].per_task["thriller"]
    first, _ = grad_cam(net, batch, "thriller", stage=1)
    second, scores = grad_cam(net, batch, "thriller", stage=2)
    assert second.shape == (2, 64, 64) and not torch.allclose(first, second, atol=1e-3)
    with torch.no_grad():
        logits = cascade.head(cascade.trunk(net.normalize(batch)))["logits"]
    torch.testing.assert_close(scores, logits[:, 1:].logsumexp(dim=1) - logits[:, 0])
    # Changing the second network's head changes stage 2 only.
    changed = copy.deepcopy(net)
    with torch.no_grad():
        changed.features["cascade"].per_task["thriller"].head.fc.weight.mul_(-1)
    torch.testing.assert_close(grad_cam(changed, batch, "thriller", stage=1)[0], first, atol=0, rtol=0)
    assert not torch.allclose(grad_cam(changed, batch, "thriller", stage=2)[0], second, atol=1e-3)
    with pytest.raises(ValueError, match="task 'disgusting' has 1 stage.*tasks with a stage 2: thriller"):
        grad_cam(net, batch, "disgusting", stage=2)


def test_grad_cam_names_what_it_knows(built):
    net, _, _ = built
    batch = images(1)
    with pytest.raises(ValueError, match="unknown task 'nope'; known tasks: disgusting, thriller, scene_tags"):
        grad_cam(net, batch, "nope")
    with pytest.raises(ValueError, match="unknown label 'nope'.*labels it explains: sky, cloud"):
        grad_cam(net, batch, "scene_tags", "nope")
    with pytest.raises(ValueError, match="no label given for this multilabel task"):
        grad_cam(net, batch, "scene_tags")
    with pytest.raises(ValueError, match="level must be in 0..4"):
        grad_cam(net, batch, "disgusting", level=5)
    # Several targets from one forward pass: each as if alone.
    together = grad_cams(net, batch, "scene_tags", ["sky", "water"])
    for target, (maps, scores) in zip(["sky", "water"], together):
        alone = grad_cam(net, batch, "scene_tags", target)
        assert torch.equal(maps, alone[0]) and torch.equal(scores, alone[1])
    assert not torch.equal(together[0][1], together[1][1])
    # A shallower level, a sub-class and the PCB head all give maps.
    maps, _ = grad_cam(net, batch, "disgusting", "insects", level=2)
    assert maps.shape == (1, 64, 64) and 0 <= float(maps.min()) and float(maps.max()) == pytest.approx(1.0)  # its peak


def test_onnx_cams_match_pytorch_at_batch_one_and_three(built, exported):
    net, cfg, _ = built
    with_cams, _, parity = exported
    assert max(parity.values()) <= 1e-4
    assert {"disgusting.cam", "thriller.cam", "thriller.stage2_cam", "scene_tags.cam", "sharpness.cam"} <= set(parity)
    session = ort.InferenceSession(str(with_cams), providers=["CPUExecutionProvider"])
    names = [f"{t}.cam" for t in net.task_names] + ["thriller.stage2_cam"]
    for count in (1, 3):
        batch = images(count, seed=count)
        got = dict(zip(names, session.run(names, {"image": batch.numpy()})))
        with torch.no_grad():
            per_task = net.features_per_task(batch)
            cascade = net.features["cascade"].per_task["thriller"]
            expected = {f"{t}.cam": net.heads[t].cam(feats) for t, feats in zip(net.task_names, per_task)}
            expected["thriller.stage2_cam"] = cascade.head.cam(cascade.trunk(net.normalize(batch)))
        assert got["scene_tags.cam"].shape == (count, len(TAGS), 2, 2) and got["disgusting.cam"].shape == (count, 2, 2)
        for name in names:
            np.testing.assert_allclose(got[name], expected[name].numpy(), atol=1e-4, rtol=0)


def test_cam_export_keeps_the_other_outputs_describes_the_maps_and_folds_batchnorm(built, exported, tmp_path):
    net, _, _ = built
    with_cams, _, _ = exported
    batch = images(2)
    with torch.no_grad():
        plain, both = DeployGraph(net, THRESHOLDS)(batch), DeployGraph(net, THRESHOLDS, cams=True)(batch)
    assert not any(name.endswith("cam") for name in plain)
    assert [name for name in both if not name.endswith("cam")] == list(plain)
    for name, value in plain.items():
        assert torch.equal(both[name], value)
    model = onnx.load(str(with_cams))
    assert [o.name for o in model.graph.output] == list(both)
    assert all(o.type.tensor_type.shape.dim[0].dim_param for o in model.graph.output)
    meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    tasks = {t["name"]: t for t in meta["tasks"]}
    assert tasks["scene_tags"]["cam"]["output"] == "scene_tags.cam"
    assert tasks["scene_tags"]["cam"]["shape"] == "(N, labels, h, w)"
    assert tasks["sharpness"]["cam"]["shape"] == "(N, h, w)" and "s(x)" in tasks["sharpness"]["cam"]["meaning"]
    assert tasks["disgusting"]["cam"]["stride"] == net.trunk.reductions[-1] == 32
    assert tasks["disgusting"]["cam"]["size"] == [2, 2]
    assert tasks["thriller"]["cam"]["stage2"]["output"] == "thriller.stage2_cam"
    assert "stage2" not in tasks["disgusting"]["cam"]
    options = ort.SessionOptions()
    # The extended level leaves out the NCHWc pass, which would hide an unfolded BatchNorm.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(with_cams), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["BatchNormalization"] == 0


def test_overlay_normalises_resizes_and_names():
    np.testing.assert_allclose(normalize_map(np.array([[-1.0, 0.0], [1.0, 3.0]])), [[0, 0], [1 / 3, 1]], rtol=1e-6)
    assert not normalize_map(-np.ones((2, 2))).any()
    image = np.full((30, 50, 3), 128, dtype=np.uint8)
    blended = overlay(image, np.array([[0.0, 0.0], [0.0, 5.0]]))
    assert blended.shape == (30, 50, 3) and blended.dtype == np.uint8
    # JET: red where the map peaks (bottom right), blue where it is zero (top left).
    assert blended[-1, -1, 0] > blended[-1, -1, 2] and blended[0, 0, 2] > blended[0, 0, 0]
    stems = UniqueStems()
    assert [stems(p) for p in ["a/x.jpg", "b/x.png", "x-2.jpg", "c/x.jpg", "we.ird name.jpg"]] == [
        "x", "x-2", "x-2-2", "x-3", "we_ird_name"]
    assert overlay_name("x", "scene_tags", "a b/c", stage2=True) == "x.scene_tags.a_b_c.stage2.png"


def _checkpoint(built, folder: Path) -> Path:
    """A checkpoint as training writes it (config snapshot + the net's weights under ``net.``)."""
    net, cfg, _ = built
    path = folder / "best_epoch_1.pth"
    torch.save({"meta": {"waterdrop": {"config": config_to_dict(cfg)}},
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


def _run_tool(name: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    code = runpy.run_path(str(REPO / "tools" / name))["main"]()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explain_tool_writes_overlays_and_an_index_and_counts_bad_images(built, demo_root, tmp_path, monkeypatch,
                                                                         capsys):
    run = tmp_path / "run"
    run.mkdir()
    _checkpoint(built, run)
    same_name = [demo_root / task / "val" / "00000.jpg" for task in ("disgusting", "thriller")]
    wide = tmp_path / "wide.png"
    cv2.imwrite(str(wide), np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    code, out, err = _run_tool("explain.py", [run, *same_name, bad, wide], monkeypatch, capsys)
    assert code == 1, err  # done, with one image that could not be decoded
    assert "broken.jpg" in err and "1 image(s) could not be decoded" in err
    folder = run / "explain"
    rows = json.loads((folder / "index.json").read_text())
    # Per image: disgusting's decision and 7 sub-classes, thriller's decision and 5 sub-classes at
    # both stages, 10 tags, sharpness.
    assert len(rows) == 3 * 31 and "3 image(s) explained: 93 overlays" in out
    files = {row["file"] for row in rows}
    assert {"00000.disgusting.png", "00000-2.disgusting.png", "00000.thriller.stage2.png", "00000.scene_tags.sky.png",
            "wide.sharpness.png"} <= files
    assert {p.name for p in folder.glob("*.png")} == files
    assert cv2.imread(str(folder / "wide.thriller.png")).shape == (40, 100, 3)
    by_file = {row["file"]: row for row in rows}
    assert by_file["00000-2.disgusting.png"]["image"] == str(same_name[1])
    assert by_file["00000.disgusting.png"]["target"] is None and by_file["00000.scene_tags.sky.png"]["target"] == "sky"
    assert (folder / "index.csv").read_text().splitlines()[0] == "image,task,stage,target,score,file"
    code, out, err = _run_tool("explain.py", [run, wide, "--task", "disgusting", "--label", "all", "--out",
                                              tmp_path / "all"], monkeypatch, capsys)
    assert code == 0 and len(json.loads((tmp_path / "all" / "index.json").read_text())) == 1 + 7
    code, out, err = _run_tool("explain.py", [run, wide, "--task", "disgusting", "--label", "insects", "--out",
                                              tmp_path / "one"], monkeypatch, capsys)
    assert code == 0 and [row["target"] for row in json.loads((tmp_path / "one" / "index.json").read_text())] == [
        "insects"]
    code, _, err = _run_tool("explain.py", [run, wide, "--task", "nope"], monkeypatch, capsys)
    assert code == 2 and "known tasks: disgusting, thriller, scene_tags, sharpness" in err
    code, _, err = _run_tool("explain.py", [run, wide, "--task", "thriller", "--label", "nope"], monkeypatch, capsys)
    assert code == 2 and "unknown label 'nope'" in err and "gore_and_blood" in err
    code, _, err = _run_tool("explain.py", [run, bad], monkeypatch, capsys)
    assert code == 1 and "broken.jpg" in err
    if not torch.cuda.is_available():
        code, _, err = _run_tool("explain.py", [run, wide, "--device", "cuda"], monkeypatch, capsys)
        assert code == 2 and "no CUDA device" in err


def test_predict_draws_the_cams_without_torch_and_refuses_a_file_without_them(exported, demo_root, tmp_path):
    with_cams, without, _ = exported
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TORCH)
    env = {"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin"}
    same_name = [demo_root / task / "val" / "00001.jpg" for task in ("disgusting", "scene_tags")]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    out = tmp_path / "cams"
    command = [sys.executable, str(REPO / "tools" / "predict.py"), str(with_cams), *map(str, same_name), str(bad),
               "--cam", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # one image could not be decoded
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert "error" in lines[2] and "cam_files" not in lines[2]
    first, second = lines[0]["cam_files"], lines[1]["cam_files"]
    assert {"00001.disgusting.png", "00001.thriller.png", "00001.thriller.stage2.png", "00001.sharpness.png"} <= set(
        first)
    assert all(name.startswith("00001-2.") for name in second)
    tags = [name.split(".")[2] for name in first if ".scene_tags." in name]
    scores = lines[0]["tasks"]["scene_tags"]["scores"]
    assert tags == [tag for tag in TAGS if scores[tag] >= 0.5]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(first + second)
    assert cv2.imread(str(out / first[0])).shape == (128, 128, 3)
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists already; pass --overwrite" in again.stderr  # overlays are kept
    every = subprocess.run([*command, "--cam-all-tags", "--overwrite"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert sum(".scene_tags." in name for name in json.loads(every.stdout.splitlines()[0])["cam_files"]) == len(TAGS)
    refused = subprocess.run([sys.executable, str(REPO / "tools" / "predict.py"), str(without), str(same_name[0]),
                              "--cam", str(tmp_path / "refused")], env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "re-export it with tools/export.py --cam" in refused.stderr
    assert refused.stdout == "" and not (tmp_path / "refused").exists()


def test_decisions_skip_only_the_maps_and_a_missing_output_still_fails(exported):
    with_cams, _, _ = exported
    predictor = Predictor(with_cams)
    image = np.zeros((40, 60, 3), np.uint8)
    assert set(predictor.predict_images([image])[0]) == {t["name"] for t in predictor.tasks}
    predictor.tasks[0]["outputs"]["prob"] = "not_in_the_file"
    with pytest.raises(KeyError, match="not_in_the_file"):
        predictor.predict_images([image])


def test_maps_come_with_the_image_they_were_computed_on(exported, tmp_path):
    with_cams, _, _ = exported
    pixels = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), pixels[:, :, ::-1])
    entry, = Predictor(with_cams).predict_paths([tmp_path / "a.png"], cams=True)
    np.testing.assert_array_equal(entry["rgb"], pixels)
    assert entry["cams"]["disgusting"].shape == (2, 2) and "disgusting" in entry["tasks"]
