"""Per-task features (see ``waterdrop.features.base``). Every module in this folder is imported
here and registers its feature itself: a new feature is one new file here, and its settings
in ``waterdrop.config.schema.FEATURE_SETTINGS``."""

import importlib
import pkgutil

from waterdrop.features.base import LossBatch, TaskFeature, register_feature, registered_features

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LossBatch", "TaskFeature", "register_feature", "registered_features"]
