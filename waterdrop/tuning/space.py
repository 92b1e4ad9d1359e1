"""The searched keys: choices or ranges of registry (``model.``, ``train.``) and task (``task.``) keys."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

#: What a search tries when the user names no space: the knobs that move AP when fine-tuning.
DEFAULT_SPACE: dict[str, Any] = {
    "model.backbone": ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"],
    "model.input_size": [160, 192, 224, 256],
    # the pretrained head convolution helped watermarks and hurt promotional text (RESULTS.md, suite.py)
    "model.head_conv": ["auto", False],
    "train.epochs": {"low": 2, "high": 6},
    "train.optimizer.lr": {"low": 3e-4, "high": 6e-3, "log": True},
    "train.optimizer.trunk_lr_mult": {"low": 0.1, "high": 1.0, "log": True},
    "train.freeze_trunk_epochs": [0, 1],
    "task.augment.crop_scale": [[0.3, 1.0], [0.6, 1.0], [0.85, 1.0], [1.0, 1.0]],
    "task.augment.color": {"low": 0.0, "high": 0.4},
    "task.augment.hflip": [True, False],
}

#: Sections of the registry a search may change; ``task.`` keys change the tuned task's YAML alone.
SHARED_SECTIONS = ("model.", "train.")
TASK_PREFIX = "task."
#: Sections whose presence turns a feature on: a searched key must not switch one on by being set.
SWITCHES = ("fusion", "distillation", "cascade", "mean_teacher", "detector", "adapters", "loss_prediction")
#: Backbones from cheapest to dearest, for the budget's lower bound.
BACKBONE_COST = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


class TuneError(ValueError):
    """A search that cannot run as asked: said before any trial starts."""


def parse_budget(text: str) -> float:
    """Seconds from ``90s``, ``20m``, ``1.5h`` or a bare number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise TuneError(f"--budget {text!r}: a positive duration such as 90s, 20m or 1.5h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _encoded(choice: Any) -> Any:
    """Optuna's choices are scalars: a list or mapping travels as its YAML text."""
    return yaml.safe_dump(choice, default_flow_style=True).strip() if isinstance(choice, (list, dict)) else choice


@dataclass
class Knob:
    """One searched key: a list of choices, or a numeric range (int when both ends are ints)."""

    key: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    @classmethod
    def parse(cls, key: str, spec: Any) -> Knob:
        if isinstance(spec, list) and spec:
            return cls(key, choices=spec)
        if isinstance(spec, dict) and set(spec) <= {"low", "high", "log"} and {"low", "high"} <= set(spec):
            low, high = spec["low"], spec["high"]
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
            if numbers and low <= high and not (spec.get("log") and low <= 0):
                return cls(key, low=low, high=high, log=bool(spec.get("log", False)))
        raise TuneError(f"search space key {key}: a non-empty list of choices, or {{low: L, high: H, log: "
                        f"true|false}} with L <= H (L > 0 for log); got {spec!r}")

    @property
    def integer(self) -> bool:
        return self.choices is None and isinstance(self.low, int) and isinstance(self.high, int)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            encoded = [_encoded(c) for c in self.choices]
            return self.choices[encoded.index(trial.suggest_categorical(self.key, encoded))]
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        value = trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)
        # Three significant digits, a recipe a person reads and keeps; never outside the range checked.
        return min(max(float(f"{value:.3g}"), float(self.low)), float(self.high))

    def extremes(self) -> list:
        """Values that between them reach every bound the schema checks."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def least(self) -> Any:
        """The value that makes a trial cheapest, for keys that set its cost."""
        if self.key == "model.backbone":
            known = [c for c in self.extremes() if c in BACKBONE_COST]
            return min(known, key=BACKBONE_COST.index) if known else self.extremes()[0]
        return min(self.extremes())


def read_space(path: str | Path | None) -> list[Knob]:
    """The knobs of a space YAML (``key: [choices]`` or ``key: {low, high, log}``), or the default space."""
    if path is None:
        spec = DEFAULT_SPACE
    else:
        try:
            spec = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise TuneError(f"--space {path}: {err}") from err
        if not isinstance(spec, dict) or not spec:
            raise TuneError(f"--space {path}: a mapping of dotted keys (e.g. model.input_size) to choices or ranges")
    knobs = []
    for key, value in spec.items():
        if not isinstance(key, str) or not key.startswith((*SHARED_SECTIONS, TASK_PREFIX)) or key.count(".") < 1:
            raise TuneError(f"search space key {key!r}: must start with model., train. or task. (the tuned task's "
                            "own YAML), e.g. model.input_size or task.augment.color")
        knobs.append(Knob.parse(key, value))
    return knobs


def set_dotted(tree: dict, dotted: str, value: Any, where: str = "the registry") -> None:
    """Set ``a.b.c`` in a YAML tree. A section that is off (null, or absent where its presence turns a
    feature on) is refused: a searched key must not switch a feature on."""
    *parents, last = dotted.split(".")
    for depth, key in enumerate(parents):
        child = tree.get(key)
        named = ".".join(parents[:depth + 1])
        if child is None and (key in tree or key in SWITCHES):
            raise TuneError(f"search space key {dotted}: {named} is off in {where}; turn it on there first (a "
                            "searched key does not switch a feature on)")
        if child is None:
            child = tree[key] = {}
        elif not isinstance(child, dict):
            raise TuneError(f"search space key {dotted}: {named} is not a section in {where}")
        tree = child
    tree[last] = value


def shown(value: Any) -> str:
    """A value as a short cell: floats to 3 significant digits, lists in brackets."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)
