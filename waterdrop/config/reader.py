"""Reading one YAML mapping key by key, with errors that name the file, the key and what was expected."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from waterdrop.config.schema import ConfigError

REQUIRED = object()

def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


class Section:
    """One mapping of a YAML file, read key by key with type checks."""

    def __init__(self, data: Any, file: Path, prefix: str = ""):
        if not isinstance(data, dict):
            raise ConfigError(file, prefix or "(top level)", f"got {_describe(data)}; expected a mapping")
        self.data, self.file, self.prefix = data, file, prefix
        self._read: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(self.file, self.path(key), f"got {_describe(value)}; expected {expected}")

    def raw(self, key: str, default: Any = REQUIRED) -> Any:
        self._read.add(key)
        if key not in self.data or self.data[key] is None and default is not REQUIRED:
            if default is REQUIRED:
                raise ConfigError(self.file, self.path(key), "missing (required)")
            return default
        return self.data[key]

    def string(self, key: str, default: Any = REQUIRED, choices: tuple[str, ...] = ()) -> Any:
        value = self.raw(key, default)
        if value is default and default is not REQUIRED:
            return value
        if not isinstance(value, str) or not value:
            raise self.fail(key, value, "a non-empty string")
        if choices and value not in choices:
            raise self.fail(key, value, "one of " + ", ".join(choices))
        return value

    def number(self, key: str, default: Any = REQUIRED, kind: type = float, low: float | None = None,
               high: float | None = None, low_open: bool = False) -> Any:
        value = self.raw(key, default)
        if value is default and default is not REQUIRED:
            return value
        ok_types = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types):
            raise self.fail(key, value, "an integer" if kind is int else "a number")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"<= {high}"
            raise self.fail(key, value, "a number " + " and ".join(p for p in (lo, hi) if p))
        return kind(value)

    def boolean(self, key: str, default: Any = REQUIRED) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, value, "true or false")
        return value

    def section(self, key: str, required: bool = False) -> Section:
        return Section(self.raw(key, REQUIRED if required else {}), self.file, self.path(key))

    def optional_section(self, key: str) -> Section | None:
        """A mapping that switches a feature on; null or absent leaves it off."""
        return None if self.raw(key, None) is None else self.section(key)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise ConfigError(self.file, self.path(unknown[0]),
                              "unknown key; allowed here: " + ", ".join(sorted(self._read)))


def read_yaml(path: Path) -> Any:
    """Parse one YAML file safely; a missing file or bad syntax names the file."""
    if not path.is_file():
        raise ConfigError(path, "(file)", "file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(path, "(syntax)", f"not valid YAML: {err}") from err


def resolve_path(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def read_settings(sec: Section, settings: type, context: dict | None = None, **given: Any) -> Any:
    """A settings dataclass (``waterdrop.config.schema.setting`` fields) from ``sec``: each field
    read by its name (or ``at``), type, default and limits; unknown keys are errors. Fields in
    ``given`` were read by the caller (with ``sec``, so that they count as known keys)."""
    hints = typing.get_type_hints(settings)
    values, parts = dict(given), {}
    for spec in dataclasses.fields(settings):
        if spec.name in given:
            continue
        meta, kind = spec.metadata, hints[spec.name]
        default = (spec.default if spec.default is not dataclasses.MISSING
                   else spec.default_factory() if spec.default_factory is not dataclasses.MISSING else REQUIRED)
        where, key = sec, spec.name
        if meta.get("at"):
            part, key = meta["at"].rsplit(".", 1)
            where = parts[part] if part in parts else parts.setdefault(part, sec.section(part))
        if meta.get("check"):
            value = where.raw(key, default)
            problem = meta["check"](value, context or {})
            if problem:
                raise where.fail(key, value, problem)
        elif kind is bool:
            value = where.boolean(key, default)
        elif kind in (int, float):
            value = where.number(key, default, kind, low=meta.get("low"), high=meta.get("high"),
                                 low_open=meta.get("low_open", False))
        elif kind is str:
            value = where.string(key, default, meta.get("choices", ()))
        else:
            value = where.raw(key, default)
        if meta.get("convert"):
            value = meta["convert"](value)
        elif typing.get_origin(kind) is tuple:
            value = tuple(kind.__args__[0](v) for v in value) if len(set(kind.__args__)) == 1 else tuple(value)
        values[spec.name] = value
    for part in (*parts.values(), sec):
        part.finish()
    return settings(**values)
