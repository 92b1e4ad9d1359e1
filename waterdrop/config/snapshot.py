"""A resolved config as plain data (str, numbers, lists, dicts), and back.

Checkpoints store this snapshot, so eval and export rebuild exactly the model that was
trained (labels in their order, heads and their arguments, relations, preprocessing)
without reading the YAML files again, which may have changed since. Plain data is what
``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from waterdrop.config.schema import (
    FEATURE_SETTINGS,
    AugmentConfig,
    DeployConfig,
    DistillationConfig,
    FusionConfig,
    LossWeightingConfig,
    ModelConfig,
    RegistryConfig,
    SamplerConfig,
    TaskConfig,
    TrainConfig,
)
from waterdrop.relations import RelationGraph
from waterdrop.weights import IMAGENET

# 2: loss_weighting.lr is recorded as the method reads it (format 1 wrote GradNorm's 0.025 for
# every method). 3: a task's features are under "features" (before: cascade, mean_teacher and
# loss_prediction beside the task's other keys, and the detector among the head's arguments).
SNAPSHOT_FORMAT = 3
# The detector's defaults when it was a head argument (format < 3 stored what the YAML gave).
_OLD_DETECTOR_DEFAULTS = {"levels": [-3, -2], "anchor_scale": 2.0, "fusion": "max", "max_boxes": 10,
                          "loss_weight": 1.0, "score_threshold": 0.3, "nms_iou": 0.45}


def _plain(value: Any) -> Any:
    if isinstance(value, RelationGraph):
        return {"implies": value.implies, "excludes": value.excludes}
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: RegistryConfig) -> dict:
    return {**_plain(cfg), "snapshot_format": SNAPSHOT_FORMAT}


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _old_features(data: dict) -> dict:
    """The features of a task snapshot taken before format 3."""
    features = {key: data.pop(key) for key in ("cascade", "mean_teacher", "loss_prediction") if data.get(key)}
    head_args = dict(data["head_args"])
    if head_args.get("detector"):
        features["detector"] = {**_OLD_DETECTOR_DEFAULTS, **head_args.pop("detector")}
    head_args.pop("detector", None)
    data["head_args"] = head_args
    return features


def _task(data: dict, snapshot_format: int) -> TaskConfig:
    data = dict(data)
    # A task snapshot with "features" is of format 3 at least, whatever the format says.
    features = data["features"] if "features" in data else _old_features(data)
    deploy = dict(data["deploy"])
    deploy["label_targets"] = {k: tuple(v) for k, v in deploy["label_targets"].items()}
    augment = dict(data["augment"], crop_scale=tuple(data["augment"]["crop_scale"]))
    relations = data["relations"]
    return TaskConfig(
        **{k: data[k] for k in ("name", "head_type", "head_args", "labels", "negative_label", "loss_weight")},
        file=Path(data["file"]), train=Path(data["train"]), val=Path(data["val"]), test=_path(data["test"]),
        unlabeled=_path(data["unlabeled"]), sampler=SamplerConfig(**data["sampler"]),
        deploy=DeployConfig(**deploy), augment=AugmentConfig(**augment),
        features={key: FEATURE_SETTINGS[key](**value) for key, value in features.items()},
        relations=None if relations is None else RelationGraph(data["labels"], relations["implies"],
                                                               relations["excludes"]))


def _train(data: dict, snapshot_format: int) -> TrainConfig:
    train = dict(data)
    # Both are absent from snapshots taken before they existed: fixed weights, no teacher.
    weighting = dict(train.get("loss_weighting", {}))
    if snapshot_format < 2 and weighting.get("type") == "uncertainty" and weighting.get("lr") == 0.025:
        weighting["lr"] = None  # format 1's default, which uncertainty weighting did not read
    train["loss_weighting"] = LossWeightingConfig(**weighting)
    distillation = train.get("distillation")
    train["distillation"] = None if distillation is None else DistillationConfig(
        **dict(distillation, teacher=Path(distillation["teacher"])))
    return TrainConfig(**train)


def _weights(pretrained: str | None) -> Path | str | None:
    # "imagenet" names packaged weights; any other string was a resolved local file.
    return pretrained if pretrained in (None, IMAGENET) else Path(pretrained)


def config_from_dict(data: dict) -> RegistryConfig:
    model = dict(data["model"])
    model["pretrained"] = _weights(model["pretrained"])
    fusion = model.get("fusion")  # absent from snapshots taken before fusion models existed
    if fusion is not None:
        fusion = FusionConfig(**dict(fusion, pretrained=_weights(fusion["pretrained"])))
    model["fusion"] = fusion
    return RegistryConfig(file=Path(data["file"]), root=Path(data["root"]), demo_data=_path(data["demo_data"]),
                          model=ModelConfig(**model), train=_train(data["train"], data.get("snapshot_format", 1)),
                          tasks=[_task(t, data.get("snapshot_format", 1)) for t in data["tasks"]])
