"""From a path to a Parquet row: decoding for the model, and the row builder (columns, Arrow schema).

Columns, one row per input (documented in the README's pool-scan section):

- ``index`` (int64): position of the input in the source's order; ``path`` (string): the
  file as opened; ``file_bytes``, ``mtime_ns`` (int64): the file's size and modification
  time when it was listed, or ``content_hash`` (string): the hash a manifest line gave for it
  (what an incremental scan compares); ``width``, ``height`` (int32):
  the original image's size; ``error`` (string): why the image was not scored, null when it was.
- ``<task>.<field>`` for every field of the runtime's result for that task
  (``Predictor.predict_paths`` gives the same values as JSON), null on error rows:
  ``score`` and ``predicted_loss`` (float32), ``positive`` (bool), ``subclass`` and
  ``grade`` (string), ``tags`` and ``added_by_relations`` / ``removed_by_relations``
  (list of strings), ``stage_scores`` (list of float32). Per-label scores
  (``scores``, ``subclass_scores``, ``above``) are lists of float32 in label order; the
  labels are in the Parquet metadata and in scan.json. Detector ``objects`` (a list of
  records) is a JSON string. A field its kind does not type (``TaskKind.result_fields``) is a
  JSON string too, so a new field never breaks a scan. The task's ``threshold`` (or
  per-label ``thresholds``) is the same for every image: it is in the metadata, not in the rows.
- ``embedding`` (a scan with embeddings): the model's L2-normalised image embedding, a
  fixed-size list of float16 (default; half the bytes, see RESULTS.md retrieval.py for what it
  costs in recall) or float32, null on error rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from waterdrop.contract import EMBEDDING_OUTPUT
from waterdrop.imageio import ImageDecodeError, read_with_size, resize, to_model_input
from waterdrop.kinds import kind_of
from waterdrop.runtime import COMMON_RESULT_FIELDS, NO_EMBEDDING, Predictor

SCAN_METADATA_KEY = b"waterdrop.scan"

_SCORES = pa.list_(pa.float32())
#: Arrow type of each type name of ``TaskKind.result_fields``.
ARROW_TYPES: dict[str, pa.DataType] = {"float32": pa.float32(), "bool": pa.bool_(), "string": pa.string(),
                                       "strings": pa.list_(pa.string()), "scores": _SCORES}
EMBEDDING_TYPES = {"float16": pa.float16(), "float32": pa.float32()}

#: What decoding gives the scorer: (resized RGB uint8, original (width, height), None) or
#: (None, None, why it failed).
Decoded = tuple[np.ndarray | None, tuple[int, int] | None, str | None]


def decode_for_model(path: str, size: int, problem: str | None = None) -> Decoded:
    """Read, decode and resize one image exactly as ``to_model_input`` does; never raises.

    ``problem`` (from the source, e.g. a bad manifest line) is returned as the error
    without touching the disk.
    """
    if problem:
        return None, None, problem
    try:
        image, original = read_with_size(path, size)  # a JPEG at the smallest DCT scale that keeps size
        return resize(image, size), original, None
    except ImageDecodeError as err:
        return None, None, str(err)
    except Exception as err:  # one odd file (an OpenCV or memory error) must not stop a scan of millions
        return None, None, f"{path}: {type(err).__name__}: {err}"


def printable(path: str) -> str:
    """The path as valid UTF-8 for the Parquet string column (undecodable bytes replaced)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class RowBuilder:
    """The columns of one model's scan, and the rows of scored or failed images.

    The fields of each task are read from the runtime's own result on a blank probe image,
    so the columns follow the model (a cascade's ``stage_scores``, a detector's ``objects``,
    ``predicted_loss``) without a second copy of the kinds' logic.

    Args:
        predictor: the model; its ``predict_batch`` scores the decoded images.
        embeddings: None, or "float16" / "float32": the ``embedding`` column's values.

    Raises:
        ValueError: embeddings asked of a model file without an embedding output, or an
            unknown value type.
    """

    def __init__(self, predictor: Predictor, embeddings: str | None = None):
        self.predictor = predictor
        if embeddings is not None and embeddings not in EMBEDDING_TYPES:
            raise ValueError(f"embedding type {embeddings!r}: choose {' or '.join(EMBEDDING_TYPES)}")
        if embeddings is not None and predictor.embedding is None:
            raise ValueError(NO_EMBEDDING)
        self.embeddings = embeddings
        size = predictor.size
        probe = predictor.predict_batch(np.zeros((1, 3, size, size), np.float32), [(size, size)])[0]
        self.fields: dict[str, list[str]] = {}
        self.labels: dict[str, list[str]] = {}
        self.constants: dict[str, dict] = {}
        columns = [
            pa.field("index", pa.int64()),
            pa.field("path", pa.string()),
            pa.field("file_bytes", pa.int64()),
            pa.field("mtime_ns", pa.int64()),
            pa.field("content_hash", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("error", pa.string()),
        ]
        self.types: dict[str, dict[str, str]] = {}
        kinds = {entry["name"]: entry["kind"] for entry in predictor.meta["tasks"]}
        for task, result in probe.items():
            types = self.types[task] = {**kind_of(kinds[task]).result_fields, **COMMON_RESULT_FIELDS}
            self.fields[task] = [key for key in result if types.get(key) != "constant"]
            self.constants[task] = {key: result[key] for key in result if types.get(key) == "constant"}
            for key in self.fields[task]:
                if isinstance(result[key], dict) and types.get(key) == "scores":
                    self.labels[f"{task}.{key}"] = list(result[key])
                columns.append(pa.field(f"{task}.{key}", ARROW_TYPES.get(types.get(key), pa.string())))
        if embeddings:
            dim = int(predictor.embedding["dim"])
            columns.append(pa.field(EMBEDDING_OUTPUT, pa.list_(EMBEDDING_TYPES[embeddings], dim)))
        self.metadata = {
            "tasks": self.constants,
            "list_labels": self.labels,
            "model_metadata": _plain_meta(predictor.meta),
        }
        self.schema = pa.schema(columns, metadata={SCAN_METADATA_KEY: json.dumps(self.metadata)})

    def rows(self, indices: Sequence[int], paths: Sequence[str], decoded: Sequence[Decoded],
             states: Sequence[tuple[int | None, int | None, str | None]] | None = None) -> list[dict]:
        """One row per input, in order; the decoded images are scored in one batch. ``states``:
        each file's (size, modification time, content hash), as listed."""
        good = [k for k, (image, _, _) in enumerate(decoded) if image is not None]
        results, vectors = {}, {}
        if good:
            batch = to_model_input([decoded[k][0] for k in good], self.predictor.size)
            sizes = [decoded[k][1] for k in good]
            if self.embeddings:
                scored, embedded = self.predictor.predict_and_embed(batch, sizes)
                vectors = dict(zip(good, embedded.astype(self.embeddings)))
            else:
                scored = self.predictor.predict_batch(batch, sizes)
            results = dict(zip(good, scored))
        rows = []
        for k, (index, path, (_, size, error)) in enumerate(zip(indices, paths, decoded)):
            row = {"index": int(index), "path": printable(path), "error": error}
            if states is not None:
                row["file_bytes"], row["mtime_ns"], row["content_hash"] = states[k]
            if k in results:
                row["width"], row["height"] = size
                for task, result in results[k].items():
                    for key in self.fields[task]:
                        row[f"{task}.{key}"] = self._value(self.types[task].get(key), result[key])
                if k in vectors:
                    row[EMBEDDING_OUTPUT] = vectors[k]
            rows.append(row)
        return rows

    def table(self, rows: list[dict]) -> pa.Table:
        """The rows as an Arrow table with this scan's schema (missing values are null)."""
        return pa.Table.from_pylist(rows, schema=self.schema)

    @staticmethod
    def _value(kind: str | None, value):
        if kind not in ARROW_TYPES:
            return json.dumps(value)
        if isinstance(value, dict):  # label -> score, in label order
            return list(value.values())
        return value


def _plain_meta(meta: dict) -> dict:
    """The model's metadata without the objects the runtime adds (the relation graph)."""
    return {**meta, "tasks": [{k: v for k, v in task.items() if k != "relation_graph"} for task in meta["tasks"]]}
