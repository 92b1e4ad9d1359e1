"""Config validation: every error names the file, the key and what was expected."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import write_registry
from waterdrop.config import ConfigError, config_from_dict, config_to_dict, load_registry
from waterdrop.config.plugins import head_declarations, kind_declarations
from waterdrop.engine.checkpoint import RunFolderError, check_resumable
from waterdrop.kinds import kind_of
from waterdrop.registry import registered_heads

REPO = Path(__file__).resolve().parents[1]


def _edit(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def test_repository_registry_and_every_task_yaml_load():
    cfg = load_registry(REPO / "registry.yaml")
    assert cfg.task_names == ["disgusting", "thriller", "scene_tags"]
    task_files = {f for f in (REPO / "tasks").glob("*.yaml") if not f.name.endswith("_relations.yaml")}
    assert {t.file for t in cfg.tasks} == task_files
    assert cfg.tasks[2].relations.closure["forest"] == {"tree"}
    assert cfg.tasks[0].deploy.prevalence == 0.005


@pytest.mark.parametrize(
    ("change", "where", "key", "words"),
    [
        (lambda r: r["train"].update(epochs="ten"), "registry", "train.epochs", "expected an integer"),
        (lambda r: r["train"].update(epoch=3), "registry", "train.epoch", "unknown key"),
        (lambda r: r["model"].pop("backbone"), "registry", "model.backbone", "missing"),
        (lambda r: r["model"].update(cbam="yes"), "registry", "model.cbam", "none, blocks, stages"),
        (lambda r: r["model"].update(head_conv="yes"), "registry", "model.head_conv", "auto, true or false"),
        (lambda r: r["model"].update(pretrained="nowhere.pth"), "registry", "model.pretrained", "local weights"),
        (lambda r: r["train"]["optimizer"].update(lr=0), "registry", "train.optimizer.lr", "> 0"),
        (lambda r: r["train"].update(checkpoint="latest"), "registry", "train.checkpoint", "best, last"),
        (lambda r: r["train"].update(schedule="linear"), "registry", "train.schedule", "cosine, onecycle"),
        (lambda r: r["train"]["task_sampling"].update(weights={"nope": 1}), "registry",
         "train.task_sampling.weights", "unknown task 'nope'"),
        (lambda t: t["head"].update(type="NoSuchHead"), "task", "head.type", "BinaryHead"),
        (lambda t: t["head"].update(gama=2), "task", "head.gama", "accepts: loss, alpha, gamma, dropout"),
        (lambda t: t.update(loss_wieght=2), "task", "loss_wieght", "unknown key"),
        (lambda t: t.update(labels=["a", "a"]), "task", "labels", "unique"),
        (lambda t: t["deploy"].update(target={"recall": 0.9, "precision": 0.5}), "task", "deploy.target",
         "exactly one"),
        (lambda t: t["deploy"].update(prevalence=2), "task", "deploy.prevalence", "<= 1"),
        (lambda t: t.update(name="bad name"), "task", "name", "underscores"),
        (lambda t: t["deploy"].update(label_targets={"insects": {"recall": 0.5}}), "task", "deploy.label_targets",
         "is for multi-label tasks"),
        (lambda t: t["data"].update(tset="x"), "task", "data.tset", "allowed here: test, train, unlabeled, val"),
        (lambda t: t["deploy"].pop("target"), "task", "deploy.target", "missing (required)"),
        (lambda t: t["augment"].update(preserve=["sharpness", "focus"]), "task", "augment.preserve",
         "scale, sharpness, colour, composition"),
        (lambda t: t["augment"].update(preserve=["scale", "scale"]), "task", "augment.preserve", "each once"),
        # disgusting.yaml sets crop_scale [0.6, 1.0] and color 0.3: a preserved property they change is an error
        (lambda t: t["augment"].update(preserve=["composition"]), "task", "augment.crop_scale",
         "[1.0, 1.0], because preserve names composition and this crop_scale would change it"),
        (lambda t: t["augment"].update(preserve=["colour"]), "task", "augment.color", "0.0, because"),
    ],
)
def test_bad_values_name_file_key_and_expectation(registry_file, change, where, key, words):
    target = registry_file if where == "registry" else registry_file.parent / "tasks" / "disgusting.yaml"
    _edit(target, change)
    with pytest.raises(ConfigError) as err:
        load_registry(registry_file)
    assert err.value.file == str(target.resolve()) or err.value.file == str(target)
    assert err.value.key == key
    assert words in str(err.value)


def test_prevalence_on_a_multilabel_task_is_rejected_not_ignored(registry_file):
    target = registry_file.parent / "tasks" / "scene_tags.yaml"
    _edit(target, lambda t: t["deploy"].update(prevalence=0.01))
    with pytest.raises(ConfigError, match="scene_tags.yaml: key 'deploy.prevalence': is read by binary tasks only"):
        load_registry(registry_file)


def test_duplicate_task_names_rejected(registry_file):
    _edit(registry_file.parent / "tasks" / "scene_tags.yaml", lambda t: t.update(name="disgusting"))
    with pytest.raises(ConfigError, match="used by more than one task file"):
        load_registry(registry_file)


def test_missing_task_file_and_bad_yaml_syntax(registry_file):
    _edit(registry_file, lambda r: r["tasks"].append("tasks/absent.yaml"))
    with pytest.raises(ConfigError, match="absent.yaml: key '\\(file\\)': file not found"):
        load_registry(registry_file)
    registry_file.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_registry(registry_file)


def test_labels_from_text_file(registry_file):
    tasks = registry_file.parent / "tasks"
    (tasks / "tags.txt").write_text("sky\ncloud\n\ngrass\n")
    _edit(tasks / "scene_tags.yaml",
          lambda t: t.update(labels="tags.txt", relations=None, detector=None, deploy={"target": {"recall": 0.9}}))
    assert load_registry(registry_file).tasks[-1].labels == ["sky", "cloud", "grass"]


def test_new_task_is_yaml_only(registry_file, demo_root):
    """A third task = one YAML file + one registry line, no Python."""
    tasks = registry_file.parent / "tasks"
    task = yaml.safe_load((tasks / "disgusting.yaml").read_text())
    task.update(name="violence", labels=["weapons"])
    (tasks / "violence.yaml").write_text(yaml.safe_dump(task))
    _edit(registry_file, lambda r: r["tasks"].append("tasks/violence.yaml"))
    assert load_registry(registry_file).task_names == ["disgusting", "thriller", "scene_tags", "violence"]


def test_heads_are_registered_by_their_modules():
    assert {"BinaryHead", "MultiLabelHead"} <= set(registered_heads())


def test_a_run_recorded_before_a_new_config_key_still_resumes(registry_file, tmp_path):
    cfg = load_registry(registry_file)
    old = {**config_to_dict(cfg), "snapshot_format": 2}
    for task in old["tasks"]:  # what a checkpoint written before loss prediction and feature settings holds
        features = task.pop("features")
        task.update(cascade=None, mean_teacher=None)
        if "detector" in features:
            task["head_args"] = {**task["head_args"], "detector": features["detector"]}
    assert config_to_dict(config_from_dict(old)) == config_to_dict(cfg)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"meta": {"waterdrop": {"config": old}}}, run / "epoch_1.pth")
    (run / "last_checkpoint").write_text(str(run / "epoch_1.pth"))
    check_resumable(run, cfg)  # no error: the missing key reads as its default
    old["train"]["epochs"] += 1
    torch.save({"meta": {"waterdrop": {"config": old}}}, run / "epoch_1.pth")
    with pytest.raises(RunFolderError, match="train.epochs"):
        check_resumable(run, cfg)


def test_a_registry_loads_without_torch_kinds_or_heads(registry_file):
    # The config layer sits below kinds and heads: it reads their declarations from source.
    code = ("import sys\n"
            "for name in ('torch', 'timm', 'mmengine'):\n"
            "    sys.modules[name] = None  # unimportable\n"
            "from waterdrop.config import load_registry\n"
            f"cfg = load_registry({str(registry_file)!r})\n"
            "print(','.join(cfg.task_names), ','.join(cfg.tasks[2].features))\n"
            "print(','.join(m for m in ('waterdrop.kinds', 'waterdrop.heads', 'waterdrop.model.head') "
            "if m in sys.modules) or 'none')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["disgusting,thriller,scene_tags", "detector", "none"]


def test_head_and_kind_declarations_read_from_source_match_the_classes():
    heads = registered_heads()
    assert set(head_declarations()) == set(heads)
    for name, declared in head_declarations().items():
        assert declared.kind == heads[name].kind and list(declared.args) == heads[name].config_args()
    for name, declared in kind_declarations().items():
        kind = kind_of(name)
        assert (declared.uses_target, declared.uses_prevalence, declared.uses_label_targets, declared.samplers) == (
            kind.uses_target, kind.uses_prevalence, kind.uses_label_targets, kind.samplers)


def test_every_package_folder_is_installed():
    # setup.py lists its packages: a new sub-package left out works in the editable install
    # of the tests and fails in a user's `pip install .`.
    listed = set(re.findall(r'"(waterdrop(?:\.\w+)*)"', (REPO / "setup.py").read_text().split("packages=[", 1)[1]
                            .split("]", 1)[0]))
    folders = {"waterdrop." + ".".join(p.parent.relative_to(REPO / "waterdrop").parts)
               for p in (REPO / "waterdrop").rglob("__init__.py") if p.parent != REPO / "waterdrop"}
    assert folders | {"waterdrop", "waterdrop.heads"} == listed


def test_preserved_properties_turn_off_the_augmentations_that_would_change_them(registry_file):
    task_file = registry_file.parent / "tasks" / "thriller.yaml"
    _edit(task_file, lambda t: t.update(augment={"preserve": ["composition"], "color": 0.2}))
    thriller = {t.name: t for t in load_registry(registry_file).tasks}["thriller"].augment
    assert thriller.preserve == ["composition"]
    assert (thriller.crop_scale, thriller.rotation, thriller.erasing, thriller.cutmix) == ((1.0, 1.0), 0.0, 0.0, 0.0)
    assert thriller.color == 0.2 and thriller.hflip  # colour and flips do not touch composition
    _edit(task_file, lambda t: t.update(augment={"preserve": ["colour"]}))
    thriller = {t.name: t for t in load_registry(registry_file).tasks}["thriller"].augment
    assert thriller.color == 0.0 and thriller.crop_scale == (0.6, 1.0)
    _edit(task_file, lambda t: t.update(augment={"preserve": ["sharpness"], "hflip": True}))
    thriller = {t.name: t for t in load_registry(registry_file).tasks}["thriller"].augment
    assert (thriller.crop_scale, thriller.rotation, thriller.color) == ((1.0, 1.0), 0.0, 0.0) and thriller.hflip
    _edit(task_file, lambda t: t.update(augment={"preserve": ["scale"], "crop_scale": [1.0, 1.0]}))
    assert {t.name: t for t in load_registry(registry_file).tasks}["thriller"].augment.crop_scale == (1.0, 1.0)


def test_without_a_crop_training_sees_the_image_as_evaluation_does():
    import numpy as np

    from waterdrop.config import AugmentConfig
    from waterdrop.data.dataset import EvalTransform, TrainTransform

    image = np.random.default_rng(0).integers(0, 256, (320, 480, 3), dtype=np.uint8)  # 3:2, as photos are
    plain = TrainTransform(64, AugmentConfig(crop_scale=(1.0, 1.0), hflip=False))
    assert plain.min_side == 64
    for _ in range(5):  # a full-area crop at a random aspect would cut up to a third of one side
        assert np.array_equal(plain(image), EvalTransform(64)(image))
    boxes = np.array([[10.0, 20.0, 110.0, 220.0]])
    _, moved, kept = plain(image, boxes)
    assert list(kept) == [0] and np.allclose(moved, boxes * ([64 / 480, 64 / 320] * 2))


def test_a_snapshot_before_head_conv_rebuilds_a_trunk_without_it(tmp_path, demo_root):
    cfg = load_registry(write_registry(tmp_path, demo_root, head_conv=True))
    assert config_from_dict(config_to_dict(cfg)).model.head_conv is True
    old = config_to_dict(cfg)
    del old["model"]["head_conv"]
    assert config_from_dict({**old, "snapshot_format": 3}).model.head_conv is False
    auto = load_registry(write_registry(tmp_path, demo_root, head_conv="auto"))
    assert config_from_dict(config_to_dict(auto)).model.head_conv == "auto"
    # models without it keep the task and embedding hashes they had before the key existed
    from waterdrop.model.lineage import model_identity

    assert model_identity(cfg)["head_conv"] is True
    assert "head_conv" not in model_identity(config_from_dict({**old, "snapshot_format": 3}))
    # identity is of the model as built: "auto" is false on test_resnet, true on an EfficientNet
    assert model_identity(auto) == model_identity(config_from_dict({**old, "snapshot_format": 3}))
    lite = {head_conv: model_identity(load_registry(write_registry(
        tmp_path, demo_root, backbone="test_efficientnet", head_conv=head_conv))) for head_conv in ("auto", True)}
    assert lite["auto"] == lite[True] and lite["auto"]["head_conv"] is True
