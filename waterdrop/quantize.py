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
import time
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

from waterdrop import mixed_precision
from waterdrop.contract import METADATA_KEY
from waterdrop.evaluation.metrics import json_safe
from waterdrop.kinds import kind_of
from waterdrop.overlay import normalize_map
from waterdrop.progress import Progress
from waterdrop.runtime import Predictor
from waterdrop.scoring import LabeledImages, TaskData, calibration_images, decode_labeled, task_metric

DEFAULT_MAX_DROP = 0.005
MAP_IMAGES = 32  # calibration images on which the class activation maps are compared
# The trunk's operators. The heads' Gemm/MatMul, Sigmoid and Softmax stay fp32 (they cost
# little): quantized, the probabilities would take 256 values at most, and the ties would move
# AP and make thresholds coarse.
QUANTIZED_OPS = ["Conv", "Clip", "Relu", "Add", "MaxPool", "AveragePool", "GlobalAveragePool"]


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


CALIBRATION_METHODS = {
    "minmax": (CalibrationMethod.MinMax, {}),
    # Clips the rare extreme activations that stretch a MinMax range over few values.
    "percentile": (CalibrationMethod.Percentile, {"CalibPercentile": 99.999}),
    "entropy": (CalibrationMethod.Entropy, {}),
}
DEFAULT_CALIBRATION_METHOD = "minmax"
DEFAULT_ORDER = "gain"  # see mixed_precision.rank_activations
SENSITIVITY_IMAGES = 64  # calibration images on which each activation's sensitivity is measured


def _options(method: str) -> dict:
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    calibrate, extra = CALIBRATION_METHODS[method]
    return {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8, "op_types_to_quantize": QUANTIZED_OPS, "calibrate_method": calibrate,
            "extra_options": dict(extra)}


def method_text(method: str) -> str:
    return ("onnxruntime quantize_static: QDQ, per-channel int8 weights (QInt8), uint8 activations (QUInt8), "
            f"{method} calibration; quantized ops: {', '.join(QUANTIZED_OPS)}")


def quantize_file(source: Path, target: Path, images: np.ndarray, method: str = DEFAULT_CALIBRATION_METHOD) -> None:
    """Write the int8 QDQ model of ``source`` to ``target`` (same outputs and metadata)."""
    with tempfile.TemporaryDirectory(prefix="waterdrop-quantize-") as tmp:
        _quantize_prepared(prepare(source, Path(tmp) / "prepared.onnx"), target, images, method)


def _quantize_prepared(prepared: Path, target: Path, images: np.ndarray, method: str) -> None:
    try:
        quantize_static(str(prepared), str(target), ImageReader(images), **_options(method))
    except ValueError as err:
        if method == "minmax":
            raise
        # onnxruntime's histogram calibrators fail on an activation that does not vary.
        raise ValueError(f"{method} calibration failed inside onnxruntime ({err}): an activation of this model "
                         "is constant on the calibration images; use --calibration-method minmax") from err


def prepare(source: Path, target: Path) -> Path:
    """The fp32 file as it is quantized (BatchNorm folded, shapes inferred): the file whose
    nodes and weights ``waterdrop.mixed_precision`` restores."""
    # Symbolic shape inference fails on these graphs; onnx's own shape inference still runs.
    quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    return target


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


class Measured:
    """Every task's gate split (and val split, where thresholds are chosen again) decoded once,
    and the fp32 file's scores on them; ``measure`` scores an int8 file against them."""

    def __init__(self, fp32: Predictor, entries: list[dict], tasks: dict[str, TaskData], batch_size: int):
        self.entries, self.batch_size = entries, batch_size
        self.splits: dict[str, dict[str, LabeledImages]] = {}
        self.fp32: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for entry in entries:
            data = tasks[entry["name"]]
            sources = {"gate": data.gate, **({"val": data.val} if data.val is not None else {})}
            decoded = {which: decode_labeled(path, entry, fp32.size) for which, path in sources.items()
                       if which == "gate" or path != data.gate}
            if "val" in sources and "val" not in decoded:
                decoded["val"] = decoded["gate"]  # the gate is the val split itself
            self.splits[entry["name"]] = decoded
            self.fp32[entry["name"]] = self._scores(fp32, entry)

    def measure(self, int8: Predictor, val_only: bool = False) -> dict[str, dict]:
        """Per task and split: the metric's name, fp32 and int8 values, the int8 scores and truth.
        ``val_only``: each task's val split alone (its gate split where it has none), as the
        mixed-precision search sees them: the test split judges only the file it chooses."""
        found = {}
        for entry in self.entries:
            splits = self.splits[entry["name"]]
            if val_only:
                which = "val" if "val" in splits else "gate"
                got = {which: splits[which].scores(int8, entry, self.batch_size)}
            else:
                got = self._scores(int8, entry)
            found[entry["name"]] = {which: self._compared(entry, which, scores) for which, (scores, _) in got.items()}
        return found

    def _compared(self, entry: dict, which: str, scores: np.ndarray) -> dict:
        before_scores, truth = self.fp32[entry["name"]][which]
        metric, before = task_metric(entry, before_scores, truth)
        return {"metric": metric, "fp32": before, "int8": task_metric(entry, scores, truth)[1], "scores": scores}

    def _scores(self, predictor: Predictor, entry: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        splits = self.splits[entry["name"]]
        gate = splits["gate"].scores(predictor, entry, self.batch_size)
        return {which: gate if split is splits["gate"] else split.scores(predictor, entry, self.batch_size)
                for which, split in splits.items()}

    @staticmethod
    def over_budget(found: dict[str, dict], max_drop: float, split: str = "val") -> list[str]:
        """The tasks whose metric drops more than ``max_drop`` on ``split`` (``val``: a task's val
        split, its gate split where it has none; ``gate``). A metric that cannot be measured
        (NaN: no positives) is not counted here: no file can fix it (a NaN on the gate split is
        a failure of the gate; one on val only leaves the val check out for that task)."""
        chosen = {name: per_split[split] if split in per_split else per_split["gate"]
                  for name, per_split in found.items()}
        return [name for name, m in chosen.items() if m["fp32"] - m["int8"] > max_drop]


def quantize(model_path: str | Path, output_path: str | Path, calibration: list[str | Path], tasks: dict[str, TaskData],
             max_drop: float = DEFAULT_MAX_DROP, force: bool = False, calibration_count: int = 256,
             batch_size: int = 16, method: str = DEFAULT_CALIBRATION_METHOD, max_fp32: int | None = None,
             order: str = DEFAULT_ORDER) -> dict:
    """Quantize, score both files, and write the int8 file unless a task drops more than
    ``max_drop`` on its gate split (test, else val) or on its val split (``force`` writes it
    anyway). When the all-int8 file is over the budget on a val split, the quantized activations
    are ranked by sensitivity and the fewest of them (at most ``max_fp32``; None: as many as it
    takes, 0: none) are kept in fp32 until every task is within the budget on its val split
    (see ``waterdrop.mixed_precision``); the test split then judges the chosen file once. A task
    without a val split (``--eval``) is searched on its gate data, which the record says.

    Returns the record also stored in the int8 file's metadata (``quantization``), plus
    ``written`` and ``failures`` (one message per task over the budget). A file with class
    activation maps also gets ``cams`` (``map_agreement``).

    Raises:
        ValueError: a task without evaluation data, unreadable data, labels that disagree, an
            unknown calibration method.
    """
    model_path, output_path = Path(model_path), Path(output_path)
    _options(method)  # an unknown method is refused before anything is decoded
    if output_path.resolve() == model_path.resolve():
        raise ValueError(f"{output_path}: the int8 file must not replace the fp32 file")
    fp32 = Predictor(model_path)
    missing = [t["name"] for t in fp32.tasks if t["name"] not in tasks]
    if missing:
        raise ValueError(f"no evaluation data for tasks {missing}: every task is measured before int8 is written")
    images, undecodable = calibration_images(calibration, calibration_count, fp32.size)
    record = {"method": method_text(method), "onnxruntime": onnxruntime.__version__, "source": model_path.name,
              "calibration": {"sources": list(map(str, calibration)), "method": method, "images": len(images),
                              "undecodable": len(undecodable), "undecodable_files": undecodable[:20]},
              "max_drop": max_drop, "tasks": {}}
    entries = json.loads(_raw_metadata(onnx.load(str(model_path))))["tasks"]
    measured = Measured(fp32, entries, tasks, batch_size)
    with tempfile.TemporaryDirectory(prefix="waterdrop-int8-") as tmp:
        prepared, int8_path = Path(tmp) / "prepared.onnx", Path(tmp) / "model.int8.onnx"
        with Progress(f"quantizing: onnxruntime calibrates on {len(images)} images ({method})", total=1,
                      unit="models", announce=True) as meter:
            _quantize_prepared(prepare(model_path, prepared), int8_path, images, method)
            meter.update(1)
        all_int8 = onnx.load(str(int8_path))
        found = measured.measure(Predictor(int8_path))
        over = measured.over_budget(found, max_drop)
        record["mixed_precision"] = {
            "all_int8_over_budget": {"val": over, "gate": measured.over_budget(found, max_drop, "gate")},
            "kept_fp32": [], "nodes_fp32": []}
        if over and max_fp32 != 0:
            unheld = [name for name, splits in measured.splits.items()
                      if "val" not in splits or splits["val"] is splits["gate"]]
            record["mixed_precision"]["chosen_on"] = "each task's val split" + (
                f"; for {', '.join(unheld)} its only split, so the gate is no held-out check there" if unheld else "")
            found = _keep_fewest_fp32(all_int8, prepared, images, entries, measured, over, max_drop, max_fp32,
                                      int8_path, record["mixed_precision"], order) or found
        predictors = {"fp32": fp32, "int8": Predictor(int8_path)}
        failures, over_on_val = [], measured.over_budget(found, max_drop)
        for entry in entries:
            data, gate = tasks[entry["name"]], found[entry["name"]]["gate"]
            split = measured.splits[entry["name"]]["gate"]
            before, after = gate["fp32"], gate["int8"]
            record["tasks"][entry["name"]] = {
                "metric": gate["metric"], "split": data.gate_split, "source": str(data.gate),
                "images": len(split.truth), "undecodable": len(split.undecodable), "fp32": before, "int8": after,
                "drop": before - after, "thresholds": _thresholds(entry, data, measured, found)}
            if "val" in found[entry["name"]] and data.val != data.gate:
                val = found[entry["name"]]["val"]
                record["tasks"][entry["name"]]["val"] = {"fp32": val["fp32"], "int8": val["int8"],
                                                         "drop": val["fp32"] - val["int8"]}
            if math.isnan(before - after):
                failures.append(f"{entry['name']}: {gate['metric']} cannot be measured on {data.gate} (no positives?)")
            elif before - after > max_drop:
                failures.append(f"{entry['name']}: {gate['metric']} {before:.4f} (fp32) -> {after:.4f} (int8) on its "
                                f"{data.gate_split} split ({len(split.truth)} images), a drop of {before - after:.4f}; "
                                f"the budget is {max_drop}")
            elif entry["name"] in over_on_val and data.val is not None:
                val = found[entry["name"]]["val"]
                failures.append(f"{entry['name']}: {val['metric']} {val['fp32']:.4f} (fp32) -> {val['int8']:.4f} "
                                f"(int8) on its val split, a drop of {val['fp32'] - val['int8']:.4f}; the budget is "
                                f"{max_drop}")
        record["speed"] = {"images_per_s": {which: images_per_second(predictor, images, batch_size)
                                            for which, predictor in predictors.items()}}
        record["speed"]["int8_over_fp32"] = record["speed"]["images_per_s"]["int8"] / record["speed"]["images_per_s"][
            "fp32"]
        if fp32.cam_outputs:
            record["cams"] = map_agreement(predictors, images[:MAP_IMAGES], batch_size)
        record.update(forced=bool(failures) and force, written=not failures or force, failures=failures)
        if record["written"]:
            _write(int8_path, output_path, record, images[:2])
    return json_safe(record)


def _keep_fewest_fp32(all_int8: onnx.ModelProto, prepared_path: Path, images: np.ndarray, entries: list[dict],
                      measured: Measured, over: list[str], max_drop: float, max_fp32: int | None, int8_path: Path,
                      record: dict, order: str) -> dict | None:
    """Rank the quantized activations by how much they cost the tasks over the budget, then keep
    the fewest of them in fp32 for which every task is within the budget on its val split. The
    passing file replaces ``int8_path``; returns its measurements (None: none passed, the
    all-int8 file stays)."""
    outputs = {entry["name"]: entry["outputs"]["prob"] for entry in entries}
    prepared = onnx.load(str(prepared_path))
    ranked = mixed_precision.rank_activations(all_int8, prepared, images[:SENSITIVITY_IMAGES], outputs, over,
                                              QUANTIZED_OPS, order=order)
    results: dict[int, dict] = {}
    trial = int8_path.with_name("trial.onnx")

    def passes(kept: list[str]) -> bool:
        onnx.save(mixed_precision.keep_fp32(all_int8, prepared, kept), str(trial))
        results[len(kept)] = measured.measure(Predictor(trial), val_only=True)
        return not measured.over_budget(results[len(kept)], max_drop)

    names = [entry["activation"] for entry in ranked]
    limit = len(names) if max_fp32 is None else min(max_fp32, len(names))
    with Progress(f"mixed precision: keeping the most sensitive of {len(names)} activations in fp32 until "
                  f"{', '.join(over)} pass", total=None, unit="files", announce=True) as meter:
        kept, tried = mixed_precision.fewest_in_fp32(names, lambda k: meter.update(1) or passes(k), limit)
    shown = ranked[:max(20, len(kept or []))]
    record["order"] = order
    record["sensitivity"] = [{key: entry[key] for key in ("activation", "gain", "mac_share")} for entry in shown]
    record["tried"] = [{"fp32_activations": count, "over_budget": measured.over_budget(results[count], max_drop),
                        "drops": {name: {which: m["fp32"] - m["int8"] for which, m in per_split.items()}
                                  for name, per_split in results[count].items()}} for count in tried]
    if kept is None:
        record["result"] = f"no file with at most {limit} activations in fp32 passed"
        return None
    chosen = mixed_precision.keep_fp32(all_int8, prepared, kept)
    onnx.save(chosen, str(int8_path))
    nodes = mixed_precision.fp32_nodes(all_int8, kept, QUANTIZED_OPS)
    macs = mixed_precision.conv_macs(prepared)
    record.update(kept_fp32=kept, nodes_fp32=nodes,
                  fp32_mac_share=sum(macs.get(node["node"], 0) for node in nodes) / (sum(macs.values()) or 1),
                  result=f"{len(kept)} of {len(names)} quantized activations kept in fp32")
    return measured.measure(Predictor(int8_path))  # now the test split too, once


def images_per_second(predictor: Predictor, images: np.ndarray, batch_size: int, seconds: float = 2.0) -> float:
    """Inference speed on ready calibration tensors (batches of ``batch_size``), after a warm-up."""
    batch = images[:batch_size].astype(np.float32)
    predictor.session.run(None, {"image": batch})
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor.session.run(None, {"image": batch})
        done += len(batch)
    return done / (time.perf_counter() - start)


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


def _thresholds(entry: dict, data: TaskData, measured: Measured, found: dict) -> dict | None:
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
    fp32_scores, truth = measured.fp32[entry["name"]]["val"]
    int8_scores = found[entry["name"]]["val"]["scores"]
    return {"fp32": exported, "int8": kind.thresholds(kind.report(data.config, int8_scores, truth)),
            "fp32_on_val": kind.thresholds(kind.report(data.config, fp32_scores, truth)), "chosen_on": "val"}


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
