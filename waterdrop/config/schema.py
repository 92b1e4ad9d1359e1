"""The validated config objects that ``registry.yaml`` and ``tasks/*.yaml`` become."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waterdrop.relations import RelationGraph

CBAM_MODES = ("none", "blocks", "stages")
SAMPLING_POLICIES = ("size", "uniform", "weights")
OPTIMIZERS = ("AdamW", "SGD")
TARGET_METRICS = ("recall", "precision")
SAMPLERS = ("plain", "balanced", "repeat_factor")
REPEAT_FUNCTIONS = ("sqrt", "uniform")
LOSS_WEIGHTINGS = ("fixed", "uncertainty", "gradnorm")
DIVERGENCES = ("js", "kl")


class ConfigError(ValueError):
    """A config file holds a bad or missing value."""

    def __init__(self, file: str | Path, key: str, problem: str):
        self.file, self.key = str(file), key
        super().__init__(f"{file}: key '{key}': {problem}")


@dataclass
class FusionConfig:
    """A second backbone whose deepest feature map is joined to the trunk's before the heads."""

    backbone: str
    pretrained: Path | str | None
    mean: list[float]
    std: list[float]


@dataclass
class ModelConfig:
    backbone: str
    pretrained: Path | str | None  # a local file, "imagenet" (packaged weights) or None
    cbam: str
    task_bn_stages: list[int]
    input_size: int
    mean: list[float]
    std: list[float]
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

    def settings(self, task: str) -> tuple[float, float]:
        """(weight, temperature) of one task."""
        own = self.tasks.get(task, {})
        return own.get("weight", self.weight), own.get("temperature", self.temperature)


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    num_workers: int
    optimizer: str
    lr: float
    weight_decay: float
    momentum: float
    warmup_epochs: float
    trunk_lr_mult: float
    freeze_trunk_epochs: int
    amp: str
    sampling_policy: str
    sampling_weights: dict[str, float]
    seed: int
    log_interval: int
    loss_weighting: LossWeightingConfig = field(default_factory=LossWeightingConfig)
    distillation: DistillationConfig | None = None


@dataclass
class DeployConfig:
    prevalence: float | None
    target_metric: str
    target_value: float
    label_targets: dict[str, tuple[str, float]] = field(default_factory=dict)

    def target_for(self, label: str) -> tuple[str, float]:
        """(metric, value) for one label: its override, else the task's target."""
        return self.label_targets.get(label, (self.target_metric, self.target_value))


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float]
    hflip: bool
    rotation: float = 0.0
    color: float = 0.0
    erasing: float = 0.0
    cutmix: float = 0.0


@dataclass
class SamplerConfig:
    type: str = "plain"
    normal_fraction: float = 0.5
    threshold: float = 0.1
    function: str = "sqrt"


@dataclass
class CascadeConfig:
    backbone: str
    hard_per_batch: int
    loss_weight: float


@dataclass
class MeanTeacherConfig:
    ema_decay: float
    consistency_weight: float
    rampup_epochs: float
    unlabeled_fraction: float


@dataclass
class LossPredictionConfig:
    levels: list[int]
    hidden: int
    margin: float
    loss_weight: float
    detach: bool


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
    cascade: CascadeConfig | None = None
    mean_teacher: MeanTeacherConfig | None = None
    loss_prediction: LossPredictionConfig | None = None
    relations: RelationGraph | None = None


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
