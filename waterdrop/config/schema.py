"""The validated config objects that ``registry.yaml`` and ``tasks/*.yaml`` become."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from waterdrop.relations import RelationGraph

CBAM_MODES = ("none", "blocks", "stages")
SAMPLING_POLICIES = ("size", "uniform", "weights")
OPTIMIZERS = ("AdamW", "SGD")
CHECKPOINT_CHOICES = ("best", "last")
SCHEDULES = ("cosine", "onecycle")
TARGET_METRICS = ("recall", "precision")
SAMPLERS = ("plain", "balanced", "repeat_factor")
REPEAT_FUNCTIONS = ("sqrt", "uniform")
LOSS_WEIGHTINGS = ("fixed", "uncertainty", "gradnorm")
DIVERGENCES = ("js", "kl")
FUSION_RULES = ("max", "mean", "none")


class ConfigError(ValueError):
    """A config file holds a bad or missing value."""

    def __init__(self, file: str | Path, key: str, problem: str):
        self.file, self.key = str(file), key
        super().__init__(f"{file}: key '{key}': {problem}")


@contextmanager
def blamed_on(file: str | Path, key: str) -> Iterator[None]:
    """Turn the ValueError or TypeError of building what a config value describes (a timm
    backbone, a head from its arguments) into a ConfigError naming that value's file and key:
    such checks need the library that builds it, which the config layer does not import."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(file, key, str(err)) from err


def setting(default: Any = MISSING, *, low: float | None = None, high: float | None = None, low_open: bool = False,
            choices: tuple[str, ...] = (), check: Callable[[Any, dict], str | None] | None = None,
            convert: Callable[[Any], Any] | None = None, at: str | None = None) -> Any:
    """A field of a settings dataclass that ``waterdrop.config.reader.read_settings`` reads from
    YAML by its name and type: no default means required; numbers are checked against ``low``
    and ``high``, strings against ``choices``. A value with a ``check(value, context)`` is read
    as it is and ``check`` returns what was expected when it is wrong (``context`` holds e.g.
    the task's ``labels``); ``convert`` then turns it into the field's value. ``at`` is where
    the key sits when not under the field's own name (``optimizer.lr``)."""
    metadata = {"low": low, "high": high, "low_open": low_open, "choices": choices, "check": check,
                "convert": convert, "at": at}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def level_problem(levels: Any, count: int | None = None, distinct: bool = False) -> str | None:
    """What is wrong with a setting that lists feature levels (0 = the stem, -1 = the deepest), or
    None. Without ``count`` (the trunk's levels, known once it is built) only the form is checked."""
    ints = isinstance(levels, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in levels)
    where = f"in 0..{count - 1} (or -1..-{count})" if count else "(0 = the stem, -1 = the deepest)"
    expected = f"a non-empty list of feature levels {where}" + (", each named once" if distinct else "")
    if not ints or not levels or count and any(not -count <= v < count for v in levels):
        return expected
    if distinct and len({v % count if count else v for v in levels}) != len(levels):
        return expected
    return None


def feature_levels(distinct: bool = False) -> Callable[[Any, dict], str | None]:
    """A ``check`` of a list of feature-level indices (their range is the trunk's to check)."""
    return lambda levels, context: level_problem(levels, distinct=distinct)


def check_levels(levels: list[int], count: int, distinct: bool = False) -> list[int]:
    """``levels`` as indices from 0 once the trunk's ``count`` is known.

    Raises:
        ValueError: a level the trunk lacks (or one named twice with ``distinct``); build the
            trunk within ``blamed_on`` to name the file and key.
    """
    problem = level_problem(levels, count, distinct)
    if problem:
        raise ValueError(f"got {levels}; expected {problem}")
    return [v % count for v in levels]


def task_labels(classes: Any, context: dict) -> str | None:
    """A ``check`` of a non-empty list of the task's labels."""
    if not isinstance(classes, list) or not classes or any(c not in context["labels"] for c in classes):
        return "a non-empty list of this task's labels"
    return None


@dataclass
class FusionConfig:
    """A second backbone whose deepest feature map is joined to the trunk's before the heads."""

    backbone: str
    pretrained: Path | str | None
    mean: list[float]
    std: list[float]


def _head_conv(value: Any, context: dict) -> str | None:
    return None if value == "auto" or isinstance(value, bool) else "auto, true or false"


def _stages(stages: Any, context: dict) -> str | None:
    problem = level_problem(stages)
    return problem + ", such as [-1]" if problem and stages != [] else None  # []: every BatchNorm shared


@dataclass
class ModelConfig:
    backbone: str = setting()
    pretrained: Path | str | None = None  # a local file, "imagenet" (packaged weights) or None; read with mean, std
    cbam: str = setting("none", choices=CBAM_MODES)
    head_conv: bool | str = setting(False, check=_head_conv)
    task_bn_stages: list[int] = setting([-1], check=_stages)
    task_bn_blocks: int | None = setting(None, low=1)
    input_size: int = setting(224, low=32)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    fusion: FusionConfig | None = None


@dataclass
class LossWeightingConfig:
    """How the tasks' losses are summed: ``fixed`` (each task's ``loss_weight``), ``uncertainty``
    (Kendall et al., 2018; ``lr``: its log-variances' learning rate, None = the optimizer's) or
    ``gradnorm`` (Chen et al., 2018; ``alpha``, and ``lr``: the step of its weights, 0.025 by default)."""

    type: str = "fixed"
    alpha: float = 1.5
    lr: float | None = None

    def __post_init__(self):
        # Settings a method does not read are dropped, and GradNorm's default step is spelt
        # out, so that runs recorded with other defaults still compare equal on resume.
        if self.type != "gradnorm":
            self.alpha = 1.5
        if self.type == "fixed":
            self.lr = None
        if self.type == "gradnorm" and self.lr is None:
            self.lr = 0.025


@dataclass
class DistillationConfig:
    """A teacher run of the same tasks trains the student through a divergence term per task;
    ``tasks`` overrides ``weight`` / ``temperature`` per task name."""

    teacher: Path
    divergence: str = "js"
    weight: float = 1.0
    temperature: float = 1.0
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Positive-congruent training (Yan et al., CVPR 2021): the teacher is the deployed model and
    #: a sample's term is weighted 1 + ``congruent_weight`` where the teacher decides it right.
    positive_congruent: bool = False
    congruent_weight: float = 5.0

    def settings(self, task: str) -> tuple[float, float]:
        """(weight, temperature) of one task."""
        own = self.tasks.get(task, {})
        return own.get("weight", self.weight), own.get("temperature", self.temperature)


def _amp(value: Any, context: dict) -> str | None:
    return None if value in ("auto", True, False) else "auto, true or false"


def _task_weights(weights: Any, context: dict) -> str | None:
    if not isinstance(weights, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in weights.values()):
        return "a mapping of task name to a weight >= 0"
    return None


@dataclass
class TrainConfig:
    epochs: int = setting(10, low=1)
    batch_size: int = setting(32, low=1)
    num_workers: int = setting(2, low=0)
    optimizer: str = setting("AdamW", choices=OPTIMIZERS, at="optimizer.type")
    lr: float = setting(1e-3, low=0, low_open=True, at="optimizer.lr")
    weight_decay: float = setting(0.05, low=0, at="optimizer.weight_decay")
    momentum: float = setting(0.9, low=0, high=1, at="optimizer.momentum")
    warmup_epochs: float = setting(1, low=0)
    schedule: str = setting("cosine", choices=SCHEDULES)
    trunk_lr_mult: float = setting(1.0, low=0, at="optimizer.trunk_lr_mult")
    freeze_trunk_epochs: int = setting(0, low=0)
    checkpoint: str = setting("best", choices=CHECKPOINT_CHOICES)
    amp: str = setting("auto", check=_amp, convert=lambda value: {True: "on", False: "off"}.get(value, "auto"))
    sampling_policy: str = setting("size", choices=SAMPLING_POLICIES, at="task_sampling.policy")
    sampling_weights: dict[str, float] = setting({}, check=_task_weights, at="task_sampling.weights",
                                                 convert=lambda weights: {str(k): float(v) for k, v in weights.items()})
    seed: int = setting(0, low=0)
    log_interval: int = setting(10, low=1)
    loss_weighting: LossWeightingConfig = field(default_factory=LossWeightingConfig)  # read by the loader
    distillation: DistillationConfig | None = None  # read by the loader


DEFAULT_MAX_METRIC_DROP = 0.01
DEFAULT_MAX_NEGATIVE_FLIP_RATE = 0.02


@dataclass
class DeployConfig:
    prevalence: float | None
    target_metric: str
    target_value: float
    label_targets: dict[str, tuple[str, float]] = field(default_factory=dict)
    #: The release gate (tools/compare.py): the largest drop of the task's headline metric,
    #: judged on the bootstrap interval of the change, and the largest negative-flip rate.
    max_metric_drop: float = DEFAULT_MAX_METRIC_DROP
    max_negative_flip_rate: float = DEFAULT_MAX_NEGATIVE_FLIP_RATE



def area_fractions(scale: Any, context: dict) -> str | None:
    """A ``check`` of ``[min, max]`` area fractions."""
    if (not isinstance(scale, (list, tuple)) or len(scale) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
            or not 0 < scale[0] <= scale[1] <= 1):
        return "[min, max] area fractions with 0 < min <= max <= 1"
    return None


#: What a quality label can depend on, and the augmentation values that keep each intact: a crop
#: zooms (scale, and sharpness: upscaling softens), rotation resamples and moves the frame, erasing
#: and cutmix paste rectangles (noise, another photo) into the picture, colour jitter shifts colour.
PRESERVED_BY: dict[str, dict[str, Any]] = {
    "scale": {"crop_scale": (1.0, 1.0), "rotation": 0.0},
    # colour jitter scales contrast (and so noise) and requantises: not for noise or compression labels
    "sharpness": {"crop_scale": (1.0, 1.0), "rotation": 0.0, "erasing": 0.0, "cutmix": 0.0, "color": 0.0},
    "colour": {"color": 0.0, "erasing": 0.0, "cutmix": 0.0},
    "composition": {"crop_scale": (1.0, 1.0), "rotation": 0.0, "erasing": 0.0, "cutmix": 0.0},
}


def preserved_properties(value: Any, context: dict) -> str | None:
    """A ``check`` of ``augment.preserve``."""
    if (not isinstance(value, list) or not all(isinstance(v, str) and v in PRESERVED_BY for v in value)
            or len(set(value)) != len(value)):
        return "a list of the properties the label depends on, each once: " + ", ".join(PRESERVED_BY)
    return None


@dataclass
class AugmentConfig:
    #: Properties the label depends on: augmentation leaves them intact (``PRESERVED_BY``).
    preserve: list[str] = setting([], check=preserved_properties)
    crop_scale: tuple[float, float] = setting((0.6, 1.0), check=area_fractions)
    hflip: bool = setting(True)
    rotation: float = setting(0.0, low=0, high=180)
    color: float = setting(0.0, low=0, high=1)
    erasing: float = setting(0.0, low=0, high=1)
    cutmix: float = setting(0.0, low=0, high=1)


@dataclass
class SamplerConfig:
    type: str = "plain"
    normal_fraction: float = 0.5
    threshold: float = 0.1
    function: str = "sqrt"


# Settings of the per-task features (``waterdrop.features``), read by their fields alone.


@dataclass
class CascadeConfig:
    backbone: str = setting()
    hard_per_batch: int = setting(8, low=1)
    loss_weight: float = setting(1.0, low=0)


@dataclass
class DetectorConfig:
    classes: list[str] = setting(check=task_labels)
    levels: list[int] = setting([-3, -2], check=feature_levels())
    anchor_scale: float = setting(2.0, low=0.1, high=32.0)
    fusion: str = setting("max", choices=FUSION_RULES)
    max_boxes: int = setting(10, low=1, high=1000)
    loss_weight: float = setting(1.0, low=0, high=100)
    score_threshold: float = setting(0.3, low=0, high=1)
    nms_iou: float = setting(0.45, low=0, high=1)


@dataclass
class MeanTeacherConfig:
    ema_decay: float = setting(0.99, low=0, high=1, low_open=True)
    consistency_weight: float = setting(10.0, low=0)
    rampup_epochs: float = setting(3.0, low=0)
    unlabeled_fraction: float = setting(0.5, low=0, high=0.95)


@dataclass
class LossPredictionConfig:
    levels: list[int] = setting([-4, -3, -2, -1], check=feature_levels(distinct=True))
    hidden: int = setting(128, low=1, high=4096)
    margin: float = setting(1.0, low=0)
    loss_weight: float = setting(1.0, low=0)
    detach: bool = setting(True)


@dataclass
class AdapterConfig:
    rank: int = setting(8, low=1, high=4096)


#: The settings of each per-task feature, by its YAML key (``waterdrop.features``).
FEATURE_SETTINGS: dict[str, type] = {"adapters": AdapterConfig, "cascade": CascadeConfig, "detector": DetectorConfig,
                                     "loss_prediction": LossPredictionConfig, "mean_teacher": MeanTeacherConfig}


@dataclass
class TaskConfig:
    name: str
    file: Path
    head_type: str
    head_args: dict[str, Any]
    labels: list[str]
    negative_label: str
    train: Path
    val: Path
    test: Path | None
    unlabeled: Path | None
    sampler: SamplerConfig
    loss_weight: float
    deploy: DeployConfig
    augment: AugmentConfig
    relations: RelationGraph | None = None
    #: Per-task features in use (``waterdrop.features``): YAML key -> its settings.
    features: dict[str, Any] = field(default_factory=dict)


@dataclass
class RegistryConfig:
    file: Path
    root: Path
    demo_data: Path | None
    model: ModelConfig
    train: TrainConfig
    tasks: list[TaskConfig] = field(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]
