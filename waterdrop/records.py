"""Task records: the one reader of a task's data, torch-free (the runtime install reads it too).

A split (train, val, test, unlabeled) is a folder with one sub-folder per label
(``root/<label>/**/<image>``) or a JSONL manifest, one object a line: ``image`` (relative to
the manifest), ``labels``, optional ``missing`` (labels not annotated for this image) and
``boxes``. Training, evaluation, cleaning, selection, quantization and the pool scan all read
through here, so a split means the same to each of them. They differ only in what a bad line
costs: ``parse_manifest`` and ``read_lines`` report it and go on (a scan or a cleaning run
counts it), the ``read_records`` family stops at it with a ``DataError`` that names the file
and line (a split to train or measure on is read whole or not at all).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from waterdrop.imageio import IMAGE_SUFFIXES, list_images

MANIFEST_SUFFIX = ".jsonl"


class DataError(ValueError):
    """A manifest or data folder is malformed; the message names the file and line."""


@dataclass
class Record:
    path: Path
    labels: list[str]
    missing: list[str] = field(default_factory=list)
    boxes: list = field(default_factory=list)
    line: int | None = None  # its line in the manifest; None for an image of a folder


class ManifestLine(NamedTuple):
    """One non-blank line of a manifest: its object with ``image`` joined to the manifest's
    folder, or None and why the line names no image."""

    number: int
    item: dict | None
    problem: str = ""


def is_manifest(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() == MANIFEST_SUFFIX and path.is_file()


def parse_manifest(manifest: str | Path) -> Iterator[ManifestLine]:
    """Every non-blank line of a JSONL manifest, one at a time (pools hold millions of lines).
    A line that is not a JSON object with a non-empty ``image`` string comes with its problem
    instead of stopping the reading; other keys are passed through unchecked."""
    folder = os.path.dirname(manifest)
    # surrogateescape: a path that is not valid UTF-8 still opens the file it names.
    with open(manifest, encoding="utf-8", errors="surrogateescape") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                yield ManifestLine(number, None, f"not JSON: {err.msg} at column {err.colno}")
                continue
            image = item.get("image") if isinstance(item, dict) else None
            if not isinstance(image, str) or not image:
                yield ManifestLine(number, None, "expected a JSON object with an 'image' path")
                continue
            yield ManifestLine(number, {**item, "image": os.path.join(folder, image)})


def _whole_lines(manifest: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every line of ``manifest``; a bad line stops the reading."""
    for line in parse_manifest(manifest):
        if line.item is None:
            raise DataError(f"{manifest}:{line.number}: {line.problem}")
        yield line.number, line.item


def _string_list(value, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{what}' must be a label name or a list of label names, got {value!r}")
    return value


def _listed(records: list[Record], source: Path) -> list[Record]:
    if not records:
        raise DataError(f"{source}: no images listed")
    return records


def read_labeled_manifest(path: Path) -> list[Record]:
    """Every line of a manifest as a record; ``labels`` is required (``[]`` is a negative).

    Raises:
        DataError: a bad line (the message names the file and line), or no line at all.
    """
    records = []
    for number, item in _whole_lines(path):
        try:
            if "labels" not in item:
                raise ValueError("missing key 'labels'")
            records.append(Record(path=Path(item["image"]), labels=_string_list(item["labels"], "labels"),
                                  missing=_string_list(item.get("missing", []), "missing"),
                                  boxes=item.get("boxes", []), line=number))
        except ValueError as err:
            raise DataError(f"{path}:{number}: {err}") from err
    return _listed(records, path)


def read_class_folders(root: Path, known: list[str] | None = None) -> list[Record]:
    """Folder per class: each image under ``root/<label>/`` (searched recursively) labelled by
    that folder's name; hidden folders and files are left out.

    Raises:
        DataError: a folder whose name is not in ``known`` (any name goes when it is None), or
            images directly in ``root``: their labels cannot be read from the layout, and
            leaving them out unsaid would shrink the split without anyone knowing.
    """
    records, loose = [], []
    for entry in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if entry.is_dir():
            if known is not None and entry.name not in known:
                raise DataError(f"{entry}: folder name '{entry.name}' is not a label; known: {', '.join(known)}")
            records += [Record(path=p, labels=[entry.name]) for p in list_images(entry)]
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            loose.append(entry)
    if loose:
        manifest = root.with_suffix(MANIFEST_SUFFIX)
        hint = f" (such as {manifest})" if manifest.is_file() else ""
        layout = f"{len(loose)} of its images lie" if records else "all of its images lie"
        raise DataError(f"{root}: {layout} directly in it, not in one folder per label, so their labels cannot "
                        f"be read from the layout. Give the task's JSONL manifest instead{hint}")
    return records


def read_records(source: Path, known: list[str]) -> list[Record]:
    """A labeled split: a folder per class (folder names in ``known``) or a manifest.

    Raises:
        DataError: neither of them, a bad line or folder, or no image at all.
    """
    if source.is_dir():
        return _listed(read_class_folders(source, known), source)
    if is_manifest(source):
        return read_labeled_manifest(source)
    raise DataError(f"{source}: expected a .jsonl manifest or a folder with one sub-folder per label")


def read_unlabeled(source: Path) -> list[Record]:
    """Unlabeled images: a folder (searched recursively, any layout) or a manifest whose labels
    are ignored.

    Raises:
        DataError: neither of them, a bad line, or no image at all.
    """
    if source.is_dir():
        records = [Record(path=p, labels=[]) for p in list_images(source)]
    elif is_manifest(source):
        records = [Record(path=Path(item["image"]), labels=[], line=number) for number, item in _whole_lines(source)]
    else:
        raise DataError(f"{source}: expected a folder of images or a .jsonl manifest")
    if not records:
        raise DataError(f"{source}: no images found")
    return records


def read_lines(source: Path, unlabelled: bool = False) -> Iterator[tuple[dict | None, str]]:
    """Every image of a folder or a manifest as the manifest line that lists it, with an
    absolute ``image`` path: (line, "") per image, (None, "MANIFEST:LINE: why") for a manifest
    line that names no image. For cleaning, which writes the lines back: other keys of a
    manifest line are carried through unchanged.

    A folder's images get the label of their class folder (see ``read_class_folders``, any
    folder name goes); with ``unlabelled`` they may lie anywhere under it and get no
    ``labels`` key at all (never ``[]``, which would read as a negative).

    Raises:
        DataError: a source that is neither a folder nor a manifest, or a folder with images
            directly in it (unless ``unlabelled``).
    """
    # abspath, not resolve: a user's symlinked data folder keeps its name.
    if source.is_dir() and unlabelled:
        for path in list_images(source):
            yield {"image": os.path.abspath(path)}, ""
    elif source.is_dir():
        try:
            records = read_class_folders(source)
        except DataError as err:
            raise DataError(f"{err}, or pass --unlabelled to clean the folder as an unlabelled pool (its rows then "
                            "carry no labels)") from err
        for record in records:
            yield {"image": os.path.abspath(record.path), "labels": record.labels}, ""
    elif is_manifest(source):
        for line in parse_manifest(source):
            if line.item is None:
                yield None, f"{source}:{line.number}: {line.problem}"
            else:
                yield {**line.item, "image": os.path.abspath(line.item["image"])}, ""
    else:
        raise DataError(f"{source}: expected a folder of images or a .jsonl manifest")


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
