"""Per-task features are plugins: one defined in this file alone takes part in the YAML, the
network, training, evaluation, export and the runtime without an edit to the library."""

import json
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tests.conftest import edit_task
from waterdrop.config import ConfigError, config_from_dict, config_to_dict, load_registry, schema
from waterdrop.config.schema import setting
from waterdrop.contract import METADATA_KEY
from waterdrop.engine.model import WaterdropModel
from waterdrop.engine.optim import parameter_groups, reorder_saved_optimizer_state
from waterdrop.evaluation.evaluate import evaluate, format_report
from waterdrop.export import export_onnx
from waterdrop.features import base
from waterdrop.features.base import TaskFeature
from waterdrop.model.head import pooled
from waterdrop.runtime import Predictor


@dataclass
class ProbeSettings:
    weight: float = setting(1.0, low=0)
    bias: float = setting(0.0)


class Probe(TaskFeature):
    """A linear probe on the task's deepest features: a raw output, a loss term, a deploy output,
    a metadata entry and an evaluation entry."""

    key = "probe"

    def __init__(self, cfg, net):
        super().__init__(cfg, net)
        for task, spec in self.settings.items():
            self.per_task[task] = nn.Linear(net.channels[-1], 1)
            nn.init.constant_(self.per_task[task].bias, spec.bias)

    def add_outputs(self, task, feats, images, outputs, complete, cams):
        if task in self.per_task:
            outputs["probe_logit"] = self.per_task[task](pooled(feats[-1])).squeeze(1)

    def deploy_outputs(self, task, outputs):
        return {"probe": torch.sigmoid(outputs["probe_logit"])} if "probe_logit" in outputs else {}

    def metadata(self, task, output_shapes):
        return {"meaning": "a linear probe", "shape": list(output_shapes["probe"])} if task in self.per_task else None

    def loss_terms(self, batch):
        return {f"{task}.loss_probe": batch.outputs[task]["probe_logit"].pow(2).mean() * spec.weight
                for task, spec in self.settings.items() if task in batch.outputs}

    def reports(self, task):
        return task in self.settings

    def report(self, task, predictions, truth, extras):
        return {"mean_prob": float(predictions["prob"].mean()), "count": int(len(truth))}

    @classmethod
    def format_report(cls, entry):
        return [f"  probe over {entry['count']} images"]


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(schema.FEATURE_SETTINGS, "probe", ProbeSettings)
    monkeypatch.setitem(base._FEATURES, "probe", Probe)


def test_a_feature_defined_in_a_test_file_runs_everywhere(probe, registry_file, tmp_path):
    edit_task(registry_file, "thriller", probe={"weight": 0.5, "bias": 2.0})
    cfg = load_registry(registry_file)
    assert cfg.tasks[1].features["probe"] == ProbeSettings(weight=0.5, bias=2.0)
    assert config_from_dict(config_to_dict(cfg)).tasks[1].features["probe"] == ProbeSettings(0.5, 2.0)
    torch.manual_seed(0)
    model = WaterdropModel(cfg)
    assert "probe" in model.net.features and list(model.net.features["probe"].per_task) == ["thriller"]

    images = torch.randint(0, 256, (4, 3, 64, 64), generator=torch.Generator().manual_seed(0)).float()
    losses = model(images, torch.tensor([0, 0, 1, 1]), {"disgusting": torch.tensor([0, 1]),
                                                         "thriller": torch.tensor([1, 0])}, mode="loss")
    assert losses["thriller.loss_probe"].item() > 0 and "disgusting.loss_probe" not in losses
    sum(v for k, v in losses.items() if "loss" in k).backward()
    assert model.net.features["probe"].per_task["thriller"].weight.grad.abs().sum() > 0

    net = model.deployed.eval()
    report = evaluate(net, cfg, tmp_path / "eval")
    assert report["thriller"]["probe"]["count"] == report["thriller"]["count"] and "probe" not in report["disgusting"]
    assert "  probe over" in format_report(report)

    thresholds = json.loads((tmp_path / "eval" / "thresholds.json").read_text())
    path = tmp_path / "model.onnx"
    parity = export_onnx(net, cfg, thresholds, path)
    assert parity["thriller.probe"] <= 1e-4 and "disgusting.probe" not in parity
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    entry = next(task for task in meta["tasks"] if task["name"] == "thriller")
    assert entry["probe"] == {"meaning": "a linear probe", "shape": [2]}
    assert entry["outputs"]["probe"] == "thriller.probe"
    with torch.no_grad():
        expected = net.forward_all(images)["thriller.probe"].numpy()
    got = session.run(["thriller.probe"], {"image": images.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    served = Predictor(str(path)).predict_batch(images.numpy(), [(64, 64)] * 4)  # the runtime serves the file
    assert len(served) == 4 and {"disgusting", "thriller", "scene_tags"} <= set(served[0])


def test_a_feature_key_is_read_like_any_other(probe, registry_file):
    edit_task(registry_file, "thriller", probe={"weigth": 0.5})
    with pytest.raises(ConfigError, match="thriller.yaml: key 'probe.weigth': unknown key; allowed here: bias, weight"):
        load_registry(registry_file)
    edit_task(registry_file, "thriller", probe={"weight": -1})
    with pytest.raises(ConfigError, match="key 'probe.weight'.*a number >= 0"):
        load_registry(registry_file)


def test_an_old_run_resumes_with_its_weights_and_optimizer_state_on_the_right_parameters(registry_file):
    # Before features had their own home, the SSD sat inside the multi-label head and the
    # cascades followed the heads; torch keeps optimizer state by parameter position.
    edit_task(registry_file, "thriller", cascade={"backbone": "test_resnet", "hard_per_batch": 2})
    model = WaterdropModel(load_registry(registry_file))
    today = model.state_dict()
    ssd = [name for name in today if ".features.detector." in name]
    rest = [name for name in today if name not in ssd]
    after_head = 1 + max(k for k, name in enumerate(rest) if name.startswith("net.heads.scene_tags."))
    old_order = rest[:after_head] + ssd + rest[after_head:]

    def old_name(name):
        name = name.replace("net.features.cascade.per_task.", "net.cascades.")
        return name.replace("net.features.detector.per_task.scene_tags.ssd.", "net.heads.scene_tags.ssd.")

    params, groups = dict(model.named_parameters()), parameter_groups(model)
    saved, offset = {}, 0
    for group in groups:
        names = sorted((name for name, _ in group), key=old_order.index)
        saved.update((offset + k, {"exp_avg": torch.zeros_like(params[name]), "owner": name})
                     for k, name in enumerate(names))
        offset += len(names)
    assert any([n for n, _ in group] != sorted((n for n, _ in group), key=old_order.index) for group in groups)
    checkpoint = {"state_dict": {old_name(name): today[name] for name in old_order},
                  "optimizer": {"state": saved, "param_groups": []}}
    reorder_saved_optimizer_state(model, checkpoint)
    flat = [name for group in groups for name, _ in group]
    assert [checkpoint["optimizer"]["state"][k]["owner"] for k in range(len(flat))] == flat
    assert str(model.load_state_dict(checkpoint["state_dict"], strict=True)) == "<All keys matched successfully>"
