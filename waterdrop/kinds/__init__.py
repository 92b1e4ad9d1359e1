"""Kinds of task (binary, multi-label, graded): see ``waterdrop.kinds.base``."""

from waterdrop.kinds import binary, graded, multilabel  # noqa: F401  (each registers its kind)
from waterdrop.kinds.base import TaskKind, kind_of, register_kind

__all__ = ["TaskKind", "kind_of", "register_kind"]
