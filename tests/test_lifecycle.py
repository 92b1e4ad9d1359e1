"""A task joins, is retrained on or leaves a trained model while every other task's outputs
stay bit for bit as they were (tools/train.py --from RUN --tasks ... --retire ...)."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from mmengine.optim import OptimWrapper

from tests.conftest import add_task, bad_input_corpus, edit_task, edit_train, write_registry
from tests.test_distributed import torchrun
from tests.test_end_to_end import REPO, _run_tool, _tool
from waterdrop.config import ConfigError, load_registry
from waterdrop.contract import METADATA_KEY
from waterdrop.engine.checkpoint import best_checkpoint, load_checkpoint, load_net
from waterdrop.engine.lifecycle import PlanError, plan_training
from waterdrop.engine.loss_weighting import last_shared_weight
from waterdrop.engine.model import WaterdropModel
from waterdrop.engine.train import run_training
from waterdrop.evaluation.evaluate import predict_split
from waterdrop.export import export_onnx
from waterdrop.model.lineage import inherit, task_hashes
from waterdrop.model.multitask import MultiTaskNet

CARRIED = ["disgusting", "thriller"]  # a mean-teacher task and a cascade task


def _spooky(demo_root) -> dict:
    """One more binary task, on the thriller demo data, trained with cutmix and residual adapters."""
    thriller = yaml.safe_load((REPO / "tasks" / "thriller.yaml").read_text())
    return {"name": "spooky", "head": {"type": "BinaryHead", "loss": "softmax"}, "labels": thriller["labels"],
            "negative_label": thriller["negative_label"],
            "data": {"train": str(demo_root / "thriller" / "train.jsonl"),
                     "val": str(demo_root / "thriller" / "val.jsonl")},
            "augment": {"cutmix": 0.5}, "adapters": {"rank": 4}, "deploy": {"target": {"recall": 0.9}}}


@pytest.fixture(scope="module")
def parent(tmp_path_factory, demo_root):
    """A model of the three demo tasks, with a mean teacher on disgusting and a cascade on thriller."""
    folder = tmp_path_factory.mktemp("parent")
    registry = write_registry(folder, demo_root)
    edit_task(registry, "disgusting", mean_teacher={"rampup_epochs": 0.5})
    edit_task(registry, "thriller", cascade={"backbone": "test_resnet", "hard_per_batch": 4})
    run_training(registry, folder / "run", printer=lambda *a, **k: None)
    return registry, folder / "run"


@pytest.fixture(scope="module")
def child(parent, demo_root, tmp_path_factory):
    """scene_tags retrained and spooky added (with cutmix), at another task mix; the rest carried over."""
    parent_registry, parent_run = parent
    folder = tmp_path_factory.mktemp("child")
    registry = write_registry(folder, demo_root)
    edit_task(registry, "disgusting", mean_teacher={"rampup_epochs": 0.5})
    edit_task(registry, "thriller", cascade={"backbone": "test_resnet", "hard_per_batch": 4})
    edit_train(registry, task_sampling={"policy": "uniform", "weights": {}}, epochs=2)
    add_task(registry, _spooky(demo_root))
    lines = []
    run_training(registry, folder / "run", printer=lambda *a, **k: lines.append(a[0]), parent=parent_run,
                 tasks=["scene_tags"])
    return registry, folder / "run", "\n".join(map(str, lines))


def _outputs(net, images):
    with torch.no_grad():
        return net.eval().forward_all(images)


def test_tasks_not_trained_keep_every_tensor_output_and_decision(parent, child, demo_root):
    _, parent_run = parent
    registry, child_run, printed = child
    old, old_cfg, _ = load_net(best_checkpoint(parent_run))
    new, new_cfg, meta = load_net(best_checkpoint(child_run))
    assert new_cfg.task_names == ["disgusting", "thriller", "scene_tags", "spooky"]
    # Every tensor they depend on, BatchNorm statistics of the shared levels and of their own
    # branches included (requires_grad=False alone would let those move).
    old_hashes, new_hashes = task_hashes(old, old_cfg), task_hashes(new, new_cfg)
    for name in CARRIED:
        assert new_hashes[name] == old_hashes[name]
    assert new_hashes["scene_tags"] != old_hashes["scene_tags"]
    old_state, new_state = old.state_dict(), new.state_dict()
    stem_stats = [k for k in old_state if k.startswith("trunk.levels.0.") and k.endswith("running_mean")]
    assert stem_stats and all(torch.equal(old_state[k], new_state[k]) for k in stem_stats)
    trained_branch = [k for k in new_state if ".branches.2." in k and k.endswith("running_mean")]
    assert trained_branch and not all(torch.equal(old_state[k], new_state[k]) for k in trained_branch)
    ups = [v for k, v in new_state.items() if k.startswith("features.adapters.per_task.spooky.") and k.endswith("up")]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # they start at zero: the adapters learned

    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 3, 64, 64)).astype(np.float32))
    before, after = _outputs(old, images), _outputs(new, images)
    carried_keys = [k for k in before if k.split(".")[0] in CARRIED]
    assert any(k.startswith("thriller.stage2") for k in carried_keys)  # the cascade's own outputs too
    for key in carried_keys:
        assert torch.equal(before[key], after[key]), key
    # Decisions on the split: the same scores and the parent's thresholds.
    old_scores, _, _ = predict_split(old, old_cfg, "val")
    new_scores, _, _ = predict_split(new, new_cfg, "val")
    for name in CARRIED:
        assert np.array_equal(old_scores[name][0], new_scores[name][0])
    old_thresholds = json.loads((parent_run / "eval" / "thresholds.json").read_text())
    new_thresholds = json.loads((child_run / "eval" / "thresholds.json").read_text())
    assert all(new_thresholds[name] == old_thresholds[name] for name in CARRIED)

    lineage = json.loads((child_run / "lineage.json").read_text())
    tasks = lineage["tasks"]
    assert lineage["parent"]["checkpoint"] == str(best_checkpoint(parent_run).resolve())
    assert {name: (tasks[name]["status"], tasks[name]["changed"]) for name in tasks} == {
        "disgusting": ("carried", False), "thriller": ("carried", False), "scene_tags": ("retrained", True),
        "spooky": ("added", True)}
    assert tasks["disgusting"]["largest_output_difference"] == 0.0 == tasks["thriller"]["largest_output_difference"]
    assert "disgusting: carried, unchanged" in printed and "scene_tags: retrained, CHANGED" in printed
    assert meta["lineage"]["carried"] == CARRIED and meta["lineage"]["added"] == ["spooky"]


def test_the_exported_files_agree_on_every_carried_task(parent, child, tmp_path):
    _, parent_run = parent
    _, child_run, _ = child
    files = {}
    for label, run in (("old", parent_run), ("new", child_run)):
        net, cfg, meta = load_net(best_checkpoint(run))
        thresholds = json.loads((run / "eval" / "thresholds.json").read_text())
        files[label] = tmp_path / f"{label}.onnx"
        export_onnx(net, cfg, thresholds, files[label], lineage=meta.get("lineage"))
    images = np.random.default_rng(1).integers(0, 256, (4, 3, 64, 64)).astype(np.float32)
    results = {}
    for label, path in files.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        results[label] = dict(zip(names, session.run(names, {"image": images})))
    carried = [k for k in results["old"] if k.split(".")[0] in CARRIED]
    worst = max(float(np.abs(results["old"][k].astype(np.float64) - results["new"][k]).max()) for k in carried)
    assert worst <= 1e-6, worst
    assert all(np.array_equal(results["old"][k], results["new"][k]) for k in carried if k.endswith("decision"))
    meta = json.loads({p.key: p.value for p in onnx.load(str(files["new"])).metadata_props}[METADATA_KEY])
    lineage = meta["lineage"]
    assert lineage["parent"]["model_hash"] and lineage["changed"] == ["scene_tags", "spooky"]
    old_meta = json.loads({p.key: p.value for p in onnx.load(str(files["old"])).metadata_props}[METADATA_KEY])
    old_entries = {t["name"]: t for t in old_meta["tasks"]}
    for entry in meta["tasks"]:
        if entry["name"] in CARRIED:
            assert entry["hash"] == old_entries[entry["name"]]["hash"]
    assert old_meta["lineage"]["parent"] is None and lineage["model_hash"] != old_meta["lineage"]["model_hash"]
    # The trunk is frozen: the embedding, and so a pool index built with the parent, still holds.
    assert meta["embedding"]["hash"] == old_meta["embedding"]["hash"]
    assert np.array_equal(results["old"]["embedding"], results["new"]["embedding"])


def test_bad_plans_are_refused_before_anything_is_written(parent, demo_root, tmp_path):
    _, parent_run = parent
    registry = write_registry(tmp_path, demo_root)
    edit_task(registry, "disgusting", mean_teacher={"rampup_epochs": 0.5})
    edit_task(registry, "thriller", cascade={"backbone": "test_resnet", "hard_per_batch": 4})
    work = tmp_path / "never"

    def refused(match, error=PlanError, **kwargs):
        with pytest.raises(error, match=match):
            run_training(registry, work, parent=parent_run, **kwargs)
        assert not work.exists()

    refused("--tasks sccene_tags: neither the registry", tasks=["sccene_tags"])
    refused("every task of .* is in the parent, so nothing would be trained")
    refused("--retire scene_tags: the registry still lists it", tasks=["thriller"], retire=["scene_tags"])
    edit_task(registry, "disgusting", labels=["insects", "reptiles"])  # changed while carried
    refused(r"disgusting.yaml: key 'labels': task disgusting is carried over", ConfigError, tasks=["thriller"])
    edit_task(registry, "disgusting", labels=yaml.safe_load((REPO / "tasks" / "disgusting.yaml").read_text())["labels"])
    listing = yaml.safe_load(registry.read_text())
    registry.write_text(yaml.safe_dump({**listing, "tasks": [t for t in listing["tasks"] if "scene" not in t]}))
    refused(r"scene_tags are not in .*retired only on purpose: --retire scene_tags", tasks=["thriller"])
    registry.write_text(yaml.safe_dump({**listing, "model": {**listing["model"], "input_size": 96}}))
    refused(r"key 'model': differs from the parent's .*model.input_size: 64 -> 96", ConfigError, tasks=["thriller"])
    registry.write_text(yaml.safe_dump(listing))
    with pytest.raises(PlanError, match="give it with --from"):
        run_training(registry, work, tasks=["thriller"])
    # Through the tool: exit 2, the message, nothing written.
    done = _run_tool("train.py", registry, "--from", parent_run, "--tasks", "nope", "--work-dir", work)
    assert done.returncode == 2 and "--tasks nope" in done.stderr and not work.exists()


def test_retiring_a_task_and_resuming_keep_the_guarantee(parent, demo_root, tmp_path):
    _, parent_run = parent
    registry = write_registry(tmp_path, demo_root)
    edit_task(registry, "disgusting", mean_teacher={"rampup_epochs": 0.5})
    listing = yaml.safe_load(registry.read_text())
    listing["tasks"] = [t for t in listing["tasks"] if "thriller" not in t]  # the cascade task retires
    registry.write_text(yaml.safe_dump(listing))
    args = ("--from", parent_run, "--tasks", "scene_tags", "--retire", "thriller")
    _tool("train.py", registry, *args, "--work-dir", tmp_path / "whole", "--epochs", "2")
    # The same run stopped after its first epoch, resumed without the plan's arguments: it keeps
    # the plan it started with.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    for later in [cut / "epoch_2.pth", *cut.glob("best_*epoch_2.pth"), cut / "lineage.json"]:
        later.unlink(missing_ok=True)
    (cut / "last_checkpoint").write_text(str(cut / "epoch_1.pth"))
    _tool("train.py", registry, "--work-dir", cut, "--epochs", "2", "--resume")
    whole = load_checkpoint(tmp_path / "whole" / "epoch_2.pth")["state_dict"]
    cut = load_checkpoint(tmp_path / "cut" / "epoch_2.pth")["state_dict"]
    worst = max(float((whole[k].double() - cut[k].double()).abs().max()) for k in whole if whole[k].numel())
    assert worst < 1e-5, worst
    lineage = json.loads((tmp_path / "cut" / "lineage.json").read_text())
    assert lineage["retired"] == ["thriller"] and not lineage["tasks"]["disgusting"]["changed"]
    assert lineage["tasks"]["disgusting"]["largest_output_difference"] == 0.0
    done = _run_tool("train.py", registry, "--from", parent_run, "--tasks", "disgusting", "--retire", "thriller",
                     "--work-dir", tmp_path / "cut", "--epochs", "3", "--resume")
    assert done.returncode == 2 and "started with another parent or other tasks" in done.stderr


def test_a_two_process_run_from_a_parent_keeps_the_carried_tasks(parent, tmp_path):
    parent_registry, parent_run = parent
    work = tmp_path / "ddp"
    torchrun(REPO / "tools" / "train.py", parent_registry, "--from", parent_run, "--tasks", "scene_tags",
             "--work-dir", work, "--launcher", "pytorch")
    lineage = json.loads((work / "lineage.json").read_text())
    assert [lineage["tasks"][name]["changed"] for name in ("disgusting", "thriller", "scene_tags")] == [
        False, False, True]
    assert lineage["tasks"]["thriller"]["largest_output_difference"] == 0.0


def test_bad_images_in_a_retrained_task_are_skipped_and_named(parent, demo_root, tmp_path):
    _, parent_run = parent
    registry = write_registry(tmp_path, demo_root)
    edit_task(registry, "disgusting", mean_teacher={"rampup_epochs": 0.5})
    edit_task(registry, "thriller", cascade={"backbone": "test_resnet", "hard_per_batch": 4})
    good, bad = bad_input_corpus(tmp_path / "odd")
    lines = (demo_root / "thriller" / "train.jsonl").read_text().splitlines()
    lines = [json.dumps({**json.loads(ln), "image": str(demo_root / "thriller" / json.loads(ln)["image"])})
             for ln in lines]
    lines += [json.dumps({"image": str(p), "labels": ["normal"]}) for p in good + bad]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    # Retrained with new data: its data paths may change, nothing else of a task must.
    edit_task(registry, "thriller", sampler="plain", data={"train": str(tmp_path / "train.jsonl"),
                                                          "val": str(demo_root / "thriller" / "val.jsonl")})
    done = _run_tool("train.py", registry, "--from", parent_run, "--tasks", "thriller", "--work-dir", tmp_path / "run")
    assert done.returncode == 1, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["skipped_images"]["thriller"]) == {str(p) for p in bad}
    lineage = json.loads((tmp_path / "run" / "lineage.json").read_text())
    assert [lineage["tasks"][n]["changed"] for n in ("disgusting", "thriller", "scene_tags")] == [False, True, False]


def test_a_nan_batch_and_a_training_step_leave_frozen_tensors_alone(registry_file):
    model = WaterdropModel(load_registry(registry_file))
    model.train_only(["scene_tags"])
    model.train()
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5))
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    images = torch.randint(0, 256, (4, 3, 64, 64)).float()
    batch = {"task_index": torch.tensor([2, 2, 2, 2]), "targets": {"scene_tags": torch.ones(4, 10)}}
    model.train_step({**batch, "inputs": torch.full_like(images, float("nan"))}, wrapper)
    model.train_step({**batch, "inputs": images}, wrapper)
    state = model.net.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(state[k], v)}
    owned = {k for k in state if k.startswith(("heads.scene_tags.", "features.detector.per_task.scene_tags."))
             or ".branches.2." in k}
    assert changed and changed <= owned, sorted(changed - owned)[:3]
    assert any(k.endswith("running_mean") for k in changed)  # its own statistics do learn


def test_a_retrained_task_whose_labels_changed_starts_with_a_fresh_head(parent, demo_root, tmp_path):
    _, parent_run = parent
    registry = write_registry(tmp_path, demo_root)
    edit_task(registry, "disgusting", mean_teacher={"rampup_epochs": 0.5})
    edit_task(registry, "thriller", cascade={"backbone": "test_resnet", "hard_per_batch": 4})
    labels = yaml.safe_load((REPO / "tasks" / "scene_tags.yaml").read_text())["labels"]
    edit_task(registry, "scene_tags", labels=labels[::-1])  # the same shape, another meaning
    cfg = load_registry(registry)
    plan, parent_net = plan_training(cfg, parent_run, ["scene_tags"], [])
    assert plan.fresh == ["scene_tags"] and plan.retrained == ["scene_tags"]
    child = MultiTaskNet(cfg)
    origin = inherit(child, parent_net.state_dict(), parent_net.task_names, set(plan.trained), set(plan.fresh))
    assert "head and features fresh" in origin["scene_tags"]
    old, new = parent_net.state_dict(), child.state_dict()
    assert not torch.equal(old["heads.scene_tags.fc.weight"], new["heads.scene_tags.fc.weight"])
    branch = [k for k in new if ".branches.2." in k]
    assert branch and all(torch.equal(old[k], new[k]) for k in branch)


def test_gradnorm_finds_the_shared_layer_beside_adapters(registry_file):
    edit_task(registry_file, "thriller", adapters={"rank": 2})
    model = WaterdropModel(load_registry(registry_file))
    weight = last_shared_weight(model.net.trunk)
    assert any(weight is p for p in model.net.trunk.parameters())
