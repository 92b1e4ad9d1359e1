"""A task split's records from a JSONL manifest or a folder per class, and manifests written
back; torch-free, so the runtime-side tools (selection, quantization) read them too."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from waterdrop.imageio import list_images


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


def read_folders(root: Path, known: list[str]) -> list[Record]:
    """Folder per class: ``root/<label>/**/*.jpg``; hidden folders and files are skipped."""
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name not in known:
            raise DataError(f"{folder}: folder name '{folder.name}' is not a label; known: {', '.join(known)}")
        records += [Record(path=p, labels=[folder.name]) for p in list_images(folder)]
    return records


def read_records(source: Path, known: list[str]) -> list[Record]:
    if source.is_dir():
        records = read_folders(source, known)
    elif source.is_file() and source.suffix == ".jsonl":
        records = read_manifest(source)
    else:
        raise DataError(f"{source}: expected a .jsonl manifest or a folder with one sub-folder per label")
    if not records:
        raise DataError(f"{source}: no images listed")
    return records


def write_manifest(records: list[Record], path: Path) -> None:
    """A JSONL manifest of ``records`` with absolute image paths, readable as a task's split."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            line = {"image": str(Path(record.path).resolve()), "labels": record.labels}
            if record.missing:
                line["missing"] = record.missing
            if record.boxes:
                line["boxes"] = record.boxes
            f.write(json.dumps(line) + "\n")
