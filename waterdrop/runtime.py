"""Serve an exported waterdrop model with onnxruntime, numpy and OpenCV only (no torch).

    from waterdrop.runtime import Predictor
    predictor = Predictor("model.onnx")
    for result in predictor.predict_paths(["a.jpg", "folder/"]):
        print(result)

Each result is a plain dict: ``{"image": path, "tasks": {task: {...}}}``, or
``{"image": path, "error": why}`` for a file that cannot be decoded. A task trained with
``loss_prediction`` also gives ``"predicted_loss"`` (a float; higher = more worth labeling).

A file exported with ``tools/export.py --cam`` also holds class activation maps; they are
returned only when asked for (``predict_paths(..., cams=True)``, ``explain_batch``), as numpy
arrays beside the results, never inside the JSON-ready task results.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from waterdrop.contract import RESIZE_RULE, read_metadata
from waterdrop.imageio import ImageDecodeError, decoded_with_sizes, to_model_input
from waterdrop.kinds import kind_of
from waterdrop.relations import RelationGraph

NO_CAMS = "this model file has no class activation maps; re-export it with tools/export.py --cam"
NO_EMBEDDING = ("this model file has no embedding output (exported before embeddings existed); re-export it with "
                "tools/export.py")


#: Result fields any kind of task may have (typed as in ``TaskKind.result_fields``).
COMMON_RESULT_FIELDS = {"predicted_loss": "float32"}


def _open_session(model_path: str | Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """onnxruntime's session, or a one-line ValueError for a path that holds no ONNX model
    (onnxruntime's own message is a protobuf traceback)."""
    path = Path(model_path)
    if not path.is_file():
        raise ValueError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}, not an ONNX model file")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not an ONNX model file onnxruntime can load ({first[:200]})") from err


class Predictor:
    """One exported model, ready to score images.

    Args:
        model_path: the .onnx file written by ``tools/export.py``.
        device: "cpu" or "cuda". With "cuda" the CUDA provider must really be used;
            a silent fall-back to CPU is an error.
        threads: intra-op threads for the CPU provider (None: onnxruntime's default).
        session_config: extra onnxruntime session config entries, e.g.
            ``{"session.intra_op.allow_spinning": "0"}`` where other processes share the cores.
    """

    def __init__(self, model_path: str | Path, device: str = "cpu", threads: int | None = None,
                 session_config: dict[str, str] | None = None):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # finds the pip-installed CUDA libraries
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.session = _open_session(model_path, options, providers)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"CUDA was requested but onnxruntime runs on {self.session.get_providers()}")
        self.meta = read_metadata(self.session.get_modelmeta().custom_metadata_map, str(model_path))
        for task in self.meta["tasks"]:
            if task.get("relations"):
                task["relation_graph"] = RelationGraph(task["labels"], **task["relations"])
        self.size = int(self.meta["input"]["size"])
        if self.meta["input"].get("resize") != RESIZE_RULE:
            # Its thresholds were set on images resized another way: scores move a little here.
            warnings.warn(f"{model_path} was exported when training resized with another rule "
                          f"({self.meta['input'].get('resize')!r}) than this runtime's ({RESIZE_RULE!r}); "
                          "retrain it, or compare its scores here with tools/compare.py before trusting its "
                          "thresholds", stacklevel=2)
        self.output_names = [o.name for o in self.session.get_outputs()]
        #: Map name (``<task>``, ``<task>.stage2``) -> output name of its class activation map.
        self.cam_outputs: dict[str, str] = {}
        for task in self.tasks:
            cam = task.get("cam") or {}
            # The head's map, and those of the task's features (e.g. a cascade's "stage2").
            further = [(f"{task['name']}.{key}", entry) for key, entry in cam.items() if isinstance(entry, dict)]
            for key, entry in [(task["name"], cam), *further]:
                if entry.get("output") in self.output_names:
                    self.cam_outputs[key] = entry["output"]
        #: The metadata's ``embedding`` entry (output, dim, source, hash) where the file has one.
        self.embedding: dict | None = self.meta.get("embedding")
        if self.embedding is not None and self.embedding["output"] not in self.output_names:
            self.embedding = None
        # The maps are fetched only when asked for (explain_batch): they are the largest outputs.
        extras = {*self.cam_outputs.values(), *([self.embedding["output"]] if self.embedding else [])}
        self.decision_outputs = [name for name in self.output_names if name not in extras]

    @property
    def tasks(self) -> list[dict]:
        return self.meta["tasks"]

    def predict_images(self, images: list[np.ndarray]) -> list[dict]:
        """Decisions for RGB uint8 images of any size, one dict of tasks per image."""
        if not images:
            return []
        return self.predict_batch(*self._prepared(images))

    def _prepared(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        return to_model_input(images, self.size), [(im.shape[1], im.shape[0]) for im in images]

    def predict_batch(self, batch: np.ndarray, sizes: list[tuple[int, int]]) -> list[dict]:
        """Decisions for a batch already preprocessed by ``to_model_input`` (float32 NCHW), so
        that decoding can happen elsewhere (worker processes); ``sizes`` are the original
        images' (width, height), for boxes in their pixels."""
        return self._results(self.outputs(batch, self.decision_outputs), sizes)

    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        """The L2-normalised embeddings (N, dim) of a batch prepared by ``to_model_input``.

        Raises:
            ValueError: the file has no embedding output.
        """
        return self.predict_and_embed(batch, None)[1]

    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        """The embeddings of RGB uint8 images of any size (see ``embed_batch``)."""
        return self.embed_batch(self._prepared(images)[0])

    def predict_and_embed(self, batch: np.ndarray,
                          sizes: list[tuple[int, int]] | None) -> tuple[list[dict], np.ndarray]:
        """``predict_batch`` and ``embed_batch`` from one run of the model (``sizes`` None: the
        embeddings only)."""
        if self.embedding is None:
            raise ValueError(NO_EMBEDDING)
        names = [self.embedding["output"]] + (self.decision_outputs if sizes is not None else [])
        outputs = self.outputs(batch, names)
        results = self._results(outputs, sizes) if sizes is not None else []
        return results, outputs[self.embedding["output"]]

    def explain_batch(self, batch: np.ndarray, sizes: list[tuple[int, int]]) -> tuple[list[dict], list[dict]]:
        """Like ``predict_batch``, and per image its class activation maps: ``{"<task>": map,
        "<task>.stage2": map}`` with maps (h, w), or (labels, h, w) for a multi-label task, raw
        as the model gives them (``waterdrop.overlay`` normalises and draws them).

        Raises:
            ValueError: the file has no class activation maps.
        """
        if not self.cam_outputs:
            raise ValueError(NO_CAMS)
        outputs = self.outputs(batch, self.output_names)
        maps = [{key: outputs[name][row] for key, name in self.cam_outputs.items()} for row in range(len(batch))]
        return self._results(outputs, sizes), maps

    def outputs(self, batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """The named outputs (``<task>.<key>``) of a float32 NCHW batch, RGB 0..255 at ``size``."""
        return dict(zip(names, self.session.run(names, {"image": batch})))

    def _results(self, outputs: dict[str, np.ndarray], sizes: list[tuple[int, int]]) -> list[dict]:
        results, cam_names = [], set(self.cam_outputs.values())
        for row in range(len(sizes)):
            per_task = {}
            for task in self.tasks:
                # Maps are run only when asked for; any other output the metadata names must be there.
                task_outputs = {key: outputs[name] for key, name in task["outputs"].items()
                                if name in outputs or name not in cam_names}
                result = kind_of(task["kind"]).runtime_result(task, task_outputs, row, sizes[row])
                if "predicted_loss" in task_outputs:  # any kind of task may have a loss prediction
                    result["predicted_loss"] = round(float(task_outputs["predicted_loss"][row]), 6)
                per_task[task["name"]] = result
            results.append(per_task)
        return results

    def predict_paths(self, paths: Iterable[str | Path], batch_size: int = 16, cams: bool = False) -> Iterator[dict]:
        """Files or folders (searched recursively), in order; a bad image, and a folder without
        images, yields an error entry. With ``cams`` each decoded image's entry also holds its
        maps under ``"cams"`` (see ``explain_batch``) and the decoded RGB image under ``"rgb"``,
        to draw them on (numpy arrays, so not JSON-ready).

        Raises:
            ValueError: ``cams`` with a file that has no class activation maps.
        """
        if cams and not self.cam_outputs:
            raise ValueError(NO_CAMS)
        # Maps are drawn on the whole image; a plain prediction decodes a JPEG at the smallest DCT
        # scale that keeps the input size (``imageio.decode_image``). Boxes are in the file's pixels.
        batch: list[tuple[Path, np.ndarray, tuple[int, int]]] = []
        for path, got in decoded_with_sizes(paths, None if cams else self.size):
            if isinstance(got, ImageDecodeError):
                yield from self._flush(batch, cams)
                batch = []
                yield {"image": str(path), "error": str(got)}
                continue
            batch.append((path, *got))
            if len(batch) == batch_size:
                yield from self._flush(batch, cams)
                batch = []
        yield from self._flush(batch, cams)

    def _flush(self, batch: list[tuple[Path, np.ndarray, tuple[int, int]]], cams: bool) -> Iterator[dict]:
        if not batch:
            return
        paths, images, sizes = zip(*batch)
        inputs = to_model_input(list(images), self.size)
        if not cams:
            for path, tasks in zip(paths, self.predict_batch(inputs, list(sizes))):
                yield {"image": str(path), "tasks": tasks}
            return
        for path, image, tasks, maps in zip(paths, images, *self.explain_batch(inputs, list(sizes))):
            yield {"image": str(path), "tasks": tasks, "cams": maps, "rgb": image}
