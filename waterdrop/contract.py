"""The ONNX contract: what an exported file promises the code that serves it.

One input, ``image`` (float32 NCHW, RGB 0..255, at the metadata's ``input.size``), one
output per task output, named ``<task>.<key>``, and the image embedding ``embedding`` (N, dim),
L2-normalised, described by the metadata's ``embedding`` entry. The file's metadata entry ``waterdrop`` is
JSON: the input's preprocessing and, per task, its name, kind, head, labels, output names,
deploy target, chosen thresholds, relations and the entries of its features. Export writes
it; the runtime, the scanner, selection and quantization read it; both go through here.
Torch-free.
"""

from __future__ import annotations

import json
from typing import Any

METADATA_KEY = "waterdrop"
METADATA_FORMAT = 1
#: How images reach the model's size (imageio.resize); files exported under an older rule say theirs.
RESIZE_RULE = "stretch to size x size (cv2.resize: INTER_AREA on a side that shrinks, else LINEAR)"
#: The one output that belongs to no task (a task name cannot hold a dot, so no task output is named so).
EMBEDDING_OUTPUT = "embedding"


def output_name(task: str, key: str) -> str:
    return f"{task}.{key}"


def split_output(name: str) -> tuple[str, str]:
    """``<task>.<key>`` -> (task, key)."""
    task, key = name.split(".", 1)
    return task, key


def outputs_of(task: str, names: list[str]) -> dict[str, str]:
    """Key -> output name of every output of ``task`` among ``names`` (the embedding is no task's)."""
    return {split_output(name)[1]: name for name in names if "." in name and split_output(name)[0] == task}


def task_entry(name: str, kind, head: str, labels: list[str], negative_label: str, outputs: dict[str, str],
               thresholds: Any = None, deploy: dict | None = None, relations: dict | None = None) -> dict:
    """A task's metadata entry before its features' entries. ``kind`` is the task's ``TaskKind``:
    it says whether the task has a deploy target and under which key its ``thresholds`` go."""
    entry = {"name": name, "kind": kind.name, "head": head, "labels": list(labels), "negative_label": negative_label,
             "outputs": dict(outputs)}
    if kind.uses_target and deploy is not None:
        entry["deploy"] = deploy
    if kind.threshold_key:
        entry[kind.threshold_key] = thresholds
    if relations:
        entry["relations"] = relations
    return entry


def metadata(tasks: list[dict], backbone: str, size: int, mean: list[float], std: list[float], version: str) -> dict:
    """The whole metadata entry."""
    return {
        "format": METADATA_FORMAT,
        "waterdrop_version": version,
        "backbone": backbone,
        "input": {"name": "image", "dtype": "float32", "layout": "NCHW", "color": "RGB", "range": [0, 255],
                  "size": size, "resize": RESIZE_RULE,
                  "normalization": {"mean": mean, "std": std, "applied": "inside the model"}},
        "tasks": tasks,
    }


def read_metadata(custom_metadata: dict[str, str], where: str) -> dict:
    """The parsed metadata of a file's custom metadata map.

    Raises:
        ValueError: the file has none (not exported by waterdrop).
    """
    raw = custom_metadata.get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{where}: no '{METADATA_KEY}' metadata; export it with tools/export.py")
    return json.loads(raw)
