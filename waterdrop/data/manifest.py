"""Task manifests (JSONL) and their records; torch-free, so the runtime-side tools read them too."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A manifest or data folder is malformed; the message names the file and line."""


@dataclass
class Record:
    path: Path
    labels: list[str]
    missing: list[str] = field(default_factory=list)
    boxes: list = field(default_factory=list)


def _string_list(value, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{what}' must be a label name or a list of label names, got {value!r}")
    return value


def read_manifest(path: Path) -> list[Record]:
    """JSONL: one object a line with ``image`` (relative to the manifest), ``labels``,
    optional ``missing`` (labels not annotated for this image) and ``boxes``."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                    raise ValueError("expected an object with an 'image' path")
                if "labels" not in item:
                    raise ValueError("missing key 'labels'")
                records.append(Record(path=path.parent / item["image"],
                                      labels=_string_list(item["labels"], "labels"),
                                      missing=_string_list(item.get("missing", []), "missing"),
                                      boxes=item.get("boxes", [])))
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                raise DataError(f"{path}:{lineno}: {err}") from err
    return records
