"""A resolved config as plain data (str, numbers, lists, dicts), and back.

Checkpoints store this snapshot, so eval and export rebuild exactly the model that was
trained (labels in their order, heads and their arguments, relations, preprocessing)
without reading the YAML files again, which may have changed since. Plain data is what
``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from waterdrop.config.schema import (
    FEATURE_SETTINGS,
    ModelConfig,
    RegistryConfig,
    TaskConfig,
    TrainConfig,
)
from waterdrop.relations import RelationGraph
from waterdrop.weights import IMAGENET

# 2: loss_weighting.lr is recorded as the method reads it (format 1 wrote GradNorm's 0.025 for
# every method). 3: a task's features are under "features" (before: cascade, mean_teacher and
# loss_prediction beside the task's other keys, and the detector among the head's arguments).
# 4: model.head_conv is recorded (before it, no trunk had the head convolution).
SNAPSHOT_FORMAT = 4
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


def _value(hint: Any, value: Any) -> Any:
    """``value`` of plain data as the type ``hint`` says."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        if Path in args and str in args:  # weights: "imagenet" names packaged ones, else a resolved file
            return value if value == IMAGENET else Path(value)
        inner = [a for a in args if a is not type(None)]
        return _value(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        return _rebuild(hint, value)
    if hint is Path:
        return Path(value)
    if origin is tuple:
        return tuple(value)
    if origin is list:
        return [_value(args[0], v) for v in value]
    if origin is dict and args:
        return {k: _value(args[1], v) for k, v in value.items()}
    return value


def _rebuild(cls: type, data: dict, **given: Any) -> Any:
    """A config dataclass from its snapshot, each field by its type; a field the snapshot lacks
    (taken before the field existed) gets its default."""
    hints = typing.get_type_hints(cls)
    values = {f.name: _value(hints[f.name], data[f.name]) for f in dataclasses.fields(cls)
              if f.name in data and f.name not in given}
    return cls(**values, **given)


def _old_features(data: dict) -> dict:
    """The features of a task snapshot taken before format 3."""
    features = {key: data.pop(key) for key in ("cascade", "mean_teacher", "loss_prediction") if data.get(key)}
    head_args = dict(data["head_args"])
    if head_args.get("detector"):
        features["detector"] = {**_OLD_DETECTOR_DEFAULTS, **head_args.pop("detector")}
    head_args.pop("detector", None)
    data["head_args"] = head_args
    return features


def _task(data: dict) -> TaskConfig:
    data = dict(data)
    # A task snapshot with "features" is of format 3 at least, whatever the format says.
    features = data.pop("features") if "features" in data else _old_features(data)
    relations = data.pop("relations", None)
    graph = None if relations is None else RelationGraph(data["labels"], relations["implies"], relations["excludes"])
    return _rebuild(TaskConfig, data, relations=graph,
                    features={key: _rebuild(FEATURE_SETTINGS[key], value) for key, value in features.items()})


def config_from_dict(data: dict) -> RegistryConfig:
    snapshot_format = data.get("snapshot_format", 1)
    train = dict(data["train"])
    weighting = dict(train.get("loss_weighting", {}))
    if snapshot_format < 2 and weighting.get("type") == "uncertainty" and weighting.get("lr") == 0.025:
        weighting["lr"] = None  # format 1's default, which uncertainty weighting did not read
    train["loss_weighting"] = weighting
    model = {"head_conv": False, **data["model"]} if snapshot_format < 4 else data["model"]
    return _rebuild(RegistryConfig, data, model=_rebuild(ModelConfig, model), train=_rebuild(TrainConfig, train),
                    tasks=[_task(task) for task in data["tasks"]])
