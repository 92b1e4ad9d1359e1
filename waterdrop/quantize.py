"""Static int8 quantization of an exported model, behind an accuracy gate; torch-free.

The fp32 file is pre-processed (``quant_pre_process``: onnxruntime's basic optimisations,
BatchNorm folding included, and shape inference) and quantized with onnxruntime's
``quantize_static``: QDQ format, per-channel int8 weights, uint8 activations, MinMax ranges
calibrated on real images that go through exactly the runtime's preprocessing
(``read_image`` + ``to_model_input`` at the model's size). Both files are then scored with
onnxruntime on every task's evaluation data, each task by its kind's validation metric (AP,
mAP, mean boundary AP); the int8 file is written only when no task loses more than the budget.
Thresholds are chosen again on the int8 scores of each task's val split, with the kind's own
rule (``TaskKind.report``, as ``tools/eval.py`` does). Needs the runtime install plus ``onnx``.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from waterdrop.contract import METADATA_KEY
from waterdrop.evaluation.metrics import json_safe
from waterdrop.kinds import kind_of
from waterdrop.overlay import normalize_map
from waterdrop.progress import Progress
from waterdrop.runtime import Predictor
from waterdrop.scoring import TaskData, calibration_images, score_split, task_metric

DEFAULT_MAX_DROP = 0.005
MAP_IMAGES = 32  # calibration images on which the class activation maps are compared
# The trunk's operators. The heads' Gemm/MatMul, Sigmoid and Softmax stay fp32 (they cost
# little): quantized, the probabilities would take 256 values at most, and the ties would move
# AP and make thresholds coarse.
QUANTIZED_OPS = ["Conv", "Clip", "Relu", "Add", "MaxPool", "AveragePool", "GlobalAveragePool"]
METHOD = ("onnxruntime quantize_static: QDQ, per-channel int8 weights (QInt8), uint8 activations (QUInt8), "
          f"MinMax calibration; quantized ops: {', '.join(QUANTIZED_OPS)}")


class ImageReader(CalibrationDataReader):
    """Feeds the calibration images to onnxruntime's calibrator, ``batch_size`` at a time."""

    def __init__(self, images: np.ndarray, batch_size: int = 16):
        self.images, self.batch_size, self.start = images, batch_size, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start:self.start + self.batch_size].astype(np.float32)
        self.start += self.batch_size
        return {"image": batch}

    def rewind(self) -> None:
        self.start = 0


def quantize_file(source: Path, target: Path, images: np.ndarray) -> None:
    """Write the int8 QDQ model of ``source`` to ``target`` (same outputs and metadata)."""
    with tempfile.TemporaryDirectory(prefix="waterdrop-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference fails on these graphs; onnx's own shape inference still runs.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(target), ImageReader(images), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=QUANTIZED_OPS, calibrate_method=CalibrationMethod.MinMax)


def _set_decision_threshold(model: onnx.ModelProto, output: str, value: float) -> None:
    """Cascade tasks decide ``prob >= threshold`` inside the graph; give that node ``value``."""
    node = next((n for n in model.graph.node if output in n.output), None)
    if node is None or node.op_type != "GreaterOrEqual":
        raise ValueError(f"{output}: expected a GreaterOrEqual node to carry the cascade's threshold")
    old, node.input[1] = node.input[1], f"{output}.threshold"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, dtype=np.float32), node.input[1]))
    if not any(old in n.input for n in model.graph.node):  # else onnxruntime warns about it at every load
        for unused in [t for t in model.graph.initializer if t.name == old]:
            model.graph.initializer.remove(unused)


def quantize(model_path: str | Path, output_path: str | Path, calibration: list[str | Path], tasks: dict[str, TaskData],
             max_drop: float = DEFAULT_MAX_DROP, force: bool = False, calibration_count: int = 256,
             batch_size: int = 16) -> dict:
    """Quantize, score both files, and write the int8 file unless a task drops more than
    ``max_drop`` (``force`` writes it anyway). Returns the record also stored in the int8 file's
    metadata (``quantization``), plus ``written`` and ``failures`` (one message per task over the
    budget). A file with class activation maps also gets ``cams`` (``map_agreement``).

    Raises:
        ValueError: a task without evaluation data, unreadable data, labels that disagree.
    """
    model_path, output_path = Path(model_path), Path(output_path)
    if output_path.resolve() == model_path.resolve():
        raise ValueError(f"{output_path}: the int8 file must not replace the fp32 file")
    fp32 = Predictor(model_path)
    missing = [t["name"] for t in fp32.tasks if t["name"] not in tasks]
    if missing:
        raise ValueError(f"no evaluation data for tasks {missing}: every task is measured before int8 is written")
    images, undecodable = calibration_images(calibration, calibration_count, fp32.size)
    record = {"method": METHOD, "onnxruntime": onnxruntime.__version__, "source": model_path.name,
              "calibration": {"sources": list(map(str, calibration)), "images": len(images),
                              "undecodable": len(undecodable), "undecodable_files": undecodable[:20]},
              "max_drop": max_drop, "tasks": {}}
    failures = []
    with tempfile.TemporaryDirectory(prefix="waterdrop-int8-") as tmp:
        int8_path = Path(tmp) / "model.int8.onnx"
        with Progress(f"quantizing: onnxruntime calibrates on {len(images)} images", total=1, unit="models",
                      announce=True) as meter:
            quantize_file(model_path, int8_path, images)
            meter.update(1)
        predictors = {"fp32": fp32, "int8": Predictor(int8_path)}
        for entry in json.loads(_raw_metadata(onnx.load(str(model_path))))["tasks"]:
            data = tasks[entry["name"]]
            scores, truth, bad = score_split(predictors, entry, data.gate, batch_size)
            metric, before = task_metric(entry, scores["fp32"], truth)
            after = task_metric(entry, scores["int8"], truth)[1]
            record["tasks"][entry["name"]] = {
                "metric": metric, "split": data.gate_split, "source": str(data.gate), "images": len(truth),
                "undecodable": len(bad), "fp32": before, "int8": after, "drop": before - after,
                "thresholds": _thresholds(entry, data, predictors, (scores, truth), batch_size)}
            if math.isnan(before - after):
                failures.append(f"{entry['name']}: {metric} cannot be measured on {data.gate} (no positives?)")
            elif before - after > max_drop:
                failures.append(f"{entry['name']}: {metric} {before:.4f} (fp32) -> {after:.4f} (int8) on its "
                                f"{data.gate_split} split ({len(truth)} images), a drop of {before - after:.4f}; "
                                f"the budget is {max_drop}")
        if fp32.cam_outputs:
            record["cams"] = map_agreement(predictors, images[:MAP_IMAGES], batch_size)
        record.update(forced=bool(failures) and force, written=not failures or force, failures=failures)
        if record["written"]:
            _write(int8_path, output_path, record, images[:2])
    return json_safe(record)


def map_agreement(predictors: dict[str, Predictor], images: np.ndarray, batch_size: int = 16) -> dict[str, dict]:
    """How closely the int8 file's class activation maps follow the fp32 file's on ``images``
    (uint8 NCHW, as from ``calibration_images``), per map output: the mean absolute difference
    of the maps as drawn (ReLU, divided by their maximum; 0 = the same picture, 1 = opposite),
    and the mean Pearson correlation of the raw maps. Reported, not gated: the maps explain
    decisions, the gate is on the decisions."""
    names = list(predictors["fp32"].cam_outputs.values())
    chunks = {which: [] for which in predictors}
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype(np.float32)
        for which, predictor in predictors.items():
            chunks[which].append(predictor.outputs(batch, names))
    maps = {which: {name: np.concatenate([run[name] for run in runs]) for name in names}
            for which, runs in chunks.items()}
    agreement = {}
    for name in names:
        # One row per drawn map: an image's map, or one tag's map of a multi-label task.
        before, after = (maps[which][name].reshape(-1, *maps[which][name].shape[-2:]) for which in ("fp32", "int8"))
        drawn = [float(np.abs(normalize_map(a) - normalize_map(b)).mean()) for a, b in zip(before, after)]
        agreement[name] = {"maps": len(before), "drawn_mean_abs_difference": float(np.mean(drawn)),
                           "correlation": _mean_correlation(before, after)}
    return agreement


def _mean_correlation(before: np.ndarray, after: np.ndarray) -> float | None:
    flat_a, flat_b = before.reshape(len(before), -1), after.reshape(len(after), -1)
    centred_a, centred_b = flat_a - flat_a.mean(1, keepdims=True), flat_b - flat_b.mean(1, keepdims=True)
    spread = np.linalg.norm(centred_a, axis=1) * np.linalg.norm(centred_b, axis=1)
    varied = spread > 0  # a constant map (a 1x1 map at a tiny input) has no correlation
    if not varied.any():
        return None
    return float(((centred_a * centred_b).sum(1)[varied] / spread[varied]).mean())


def _raw_metadata(model: onnx.ModelProto) -> str:
    # quantize_static keeps the input's metadata; raw JSON, not Predictor.meta (it holds objects).
    return {p.key: p.value for p in model.metadata_props}[METADATA_KEY]


def _thresholds(entry: dict, data: TaskData, predictors: dict[str, Predictor], gate: tuple,
                batch_size: int) -> dict | None:
    """The thresholds the int8 file gets: chosen again on the int8 scores of the val split with
    the kind's rule (``TaskKind.report``, as ``tools/eval.py`` chooses them) when the val split
    and the task's deploy target are known, else the fp32 file's. ``fp32_on_val`` is the same
    rule on the fp32 scores: it shows how much of a change is the data's, not int8's."""
    kind = kind_of(entry["kind"])
    if not kind.threshold_key:
        return None
    exported = entry[kind.threshold_key]
    if data.val is None or data.config is None:
        return {"fp32": exported, "int8": exported, "chosen_on": "kept from the fp32 file (no val split given)"}
    scores, truth = gate if data.val == data.gate else score_split(predictors, entry, data.val, batch_size)[:2]
    return {"fp32": exported, "int8": kind.thresholds(kind.report(data.config, scores["int8"], truth)),
            "fp32_on_val": kind.thresholds(kind.report(data.config, scores["fp32"], truth)), "chosen_on": "val"}


def _write(int8_path: Path, output_path: Path, record: dict, images: np.ndarray) -> None:
    """Save the int8 model with its metadata (precision, the record, the int8 thresholds, which
    a cascade task also decides with inside the graph), then check that the runtime serves it."""
    model = onnx.load(str(int8_path))
    meta = json.loads(_raw_metadata(model))
    for entry in meta["tasks"]:
        chosen = record["tasks"][entry["name"]]["thresholds"]
        if chosen is not None:
            entry[kind_of(entry["kind"]).threshold_key] = chosen["int8"]
        if "decision" in entry["outputs"]:
            _set_decision_threshold(model, entry["outputs"]["decision"], float(chosen["int8"]))
    meta["precision"] = "int8"
    meta["quantization"] = json_safe({k: v for k, v in record.items() if k not in ("written", "failures")})
    next(p for p in model.metadata_props if p.key == METADATA_KEY).value = json.dumps(meta)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(output_path))
    Predictor(output_path).predict_batch(images.astype(np.float32), [(images.shape[-1],) * 2] * len(images))
