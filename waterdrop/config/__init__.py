"""Load ``registry.yaml`` and ``tasks/*.yaml`` into validated config objects (``loader``),
what those objects are (``schema``), and their plain-data snapshot for checkpoints
(``snapshot``)."""

from waterdrop.config.loader import load_registry, load_task
from waterdrop.config.reader import read_yaml
from waterdrop.config.schema import (
    AugmentConfig,
    CascadeConfig,
    ConfigError,
    DeployConfig,
    DetectorConfig,
    DistillationConfig,
    FusionConfig,
    LossPredictionConfig,
    LossWeightingConfig,
    MeanTeacherConfig,
    ModelConfig,
    RegistryConfig,
    SamplerConfig,
    TaskConfig,
    TrainConfig,
    blamed_on,
)
from waterdrop.config.snapshot import config_from_dict, config_to_dict

__all__ = [
    "AugmentConfig", "CascadeConfig", "ConfigError", "DeployConfig", "DetectorConfig", "DistillationConfig",
    "FusionConfig", "LossPredictionConfig", "LossWeightingConfig", "MeanTeacherConfig", "ModelConfig",
    "RegistryConfig", "SamplerConfig", "TaskConfig", "TrainConfig", "blamed_on", "config_from_dict", "config_to_dict",
    "load_registry", "load_task", "read_yaml",
]
