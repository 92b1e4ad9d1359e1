"""Kinds of task (binary, multi-label, graded): see ``waterdrop.kinds.base``. Every module in
this folder is imported here and registers its kind itself, so a new kind is one new file."""

import importlib
import pkgutil

from waterdrop.kinds.base import TaskKind, kind_of, register_kind

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TaskKind", "kind_of", "register_kind"]
