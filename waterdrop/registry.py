"""The head registry: a plain decorator keyed by class name, as written in task YAML ``head.type``."""

from __future__ import annotations

_HEADS: dict[str, type] = {}


def register_head(cls: type) -> type:
    """Class decorator: make ``cls`` available as ``head: {type: <ClassName>}``."""
    existing = _HEADS.get(cls.__name__)
    if existing is not None and existing is not cls:
        raise ValueError(f"two heads are named {cls.__name__}: {existing.__module__} and {cls.__module__}")
    _HEADS[cls.__name__] = cls
    return cls


def registered_heads() -> dict[str, type]:
    """All heads, after importing every module of ``waterdrop.heads`` (each registers itself)."""
    import waterdrop.heads  # noqa: F401

    return dict(_HEADS)
