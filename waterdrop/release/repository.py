"""A versioned model repository laid out for NVIDIA Triton Inference Server, and a model card.

    <repository>/<model name>/config.pbtxt          onnxruntime backend, dynamic batching, every
                                                   input and output with its type and dims
    <repository>/<model name>/<version>/model.onnx
    <repository>/<model name>/<version>/model_card.md, model_card.json, compare.md, compare.json,
                                         resolved.json

``config.pbtxt`` is Triton's ``ModelConfig`` protobuf in text form, built with the message
class that ships in ``tritonclient`` and parsed back with it, so an unknown field or a wrong
type fails here, not in a partner team's server. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import onnx

from waterdrop.config import RegistryConfig, config_to_dict
from waterdrop.contract import METADATA_KEY
from waterdrop.evaluation.metrics import json_safe
from waterdrop.records import read_records

# ONNX element types -> Triton data types (those an exported waterdrop model uses, and kin).
_TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                 onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.BOOL: "TYPE_BOOL",
                 onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
                 onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.INT8: "TYPE_INT8"}


def _tensors(values) -> list[dict]:
    """Name, Triton type and dims (batch axis left out, -1 for a dynamic one) of graph inputs or outputs."""
    described = []
    for value in values:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _TRITON_TYPES:
            raise ValueError(f"{value.name}: ONNX element type {onnx.TensorProto.DataType.Name(tensor.elem_type)} "
                             "has no Triton data type here")
        if not tensor.HasField("shape") or not tensor.shape.dim:
            raise ValueError(f"{value.name}: the ONNX file gives no shape; Triton needs its dims")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim][1:]
        entry = {"name": value.name, "data_type": _TRITON_TYPES[tensor.elem_type], "dims": dims}
        if not dims:  # one value per image ([N]): Triton wants dims [1], reshaped to the batch axis alone
            entry.update(dims=[1], reshape={"shape": []})
        described.append(entry)
    return described


def triton_config(model_path: Path, name: str, max_batch_size: int = 32,
                  preferred_batch_sizes: tuple[int, ...] = (8, 16, 32), max_queue_delay_us: int = 2000) -> str:
    """The ``config.pbtxt`` text of an exported model, checked against Triton's ``ModelConfig``.

    Raises:
        ValueError: a tensor type Triton cannot carry, or a config its schema refuses.
    """
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    if max_batch_size < 1:
        raise ValueError(f"max_batch_size {max_batch_size}: the model's first axis is its batch axis, so at least 1")
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {tensor.name for tensor in graph.initializer}
    config = {"name": name, "backend": "onnxruntime", "max_batch_size": max_batch_size,
              "input": _tensors(v for v in graph.input if v.name not in initializers),
              "output": _tensors(graph.output),
              "dynamic_batching": {"preferred_batch_size": [b for b in preferred_batch_sizes if b <= max_batch_size],
                                   "max_queue_delay_microseconds": max_queue_delay_us},
              "instance_group": [{"kind": "KIND_AUTO", "count": 1}]}
    try:
        message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
        text = text_format.MessageToString(message)
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except (json_format.ParseError, text_format.ParseError) as err:
        raise ValueError(f"Triton's ModelConfig schema refuses the generated config: {err}") from err
    return text


def content_hash(source: Path, names: list[str]) -> tuple[int, str]:
    """How many images a split (folder per class or JSONL manifest) lists, and a SHA-256 of its
    records: every image's bytes and its labels, in order."""
    digest = hashlib.sha256()
    records = read_records(source, names)
    for record in records:
        digest.update(json.dumps([record.labels, record.missing]).encode())
        try:
            digest.update(hashlib.sha256(Path(record.path).read_bytes()).digest())
        except OSError:
            digest.update(b"unreadable")
    return len(records), digest.hexdigest()


def model_card(model_path: Path, cfg: RegistryConfig | None, comparison: dict | None, version: int,
               forced: bool) -> dict:
    """What a partner team needs to know of a released version (JSON-ready)."""
    meta = json.loads({p.key: p.value for p in onnx.load(str(model_path), load_external_data=False)
                       .metadata_props}[METADATA_KEY])
    configs = {task.name: task for task in cfg.tasks} if cfg else {}
    tasks = []
    for entry in meta["tasks"]:
        task = {key: entry.get(key) for key in ("name", "kind", "head", "labels", "negative_label", "threshold",
                                                "thresholds", "deploy", "hash") if entry.get(key) is not None}
        config = configs.get(entry["name"])
        if config is not None:
            names = [config.negative_label, *config.labels]
            task["data"] = {}
            for split in ("train", "val", "test"):
                source = getattr(config, split)
                if source is not None and Path(source).exists():
                    count, digest = content_hash(Path(source), names)
                    task["data"][split] = {"source": str(source), "images": count, "sha256": digest}
        if comparison and entry["name"] in comparison["tasks"]:
            compared = comparison["tasks"][entry["name"]]
            task["release"] = {key: compared.get(key) for key in ("status", "metric", "candidate", "deployed",
                                                                  "difference", "difference_interval", "verdict",
                                                                  "problems", "split", "images")
                               if compared.get(key) is not None}
            if "flips" in compared:
                task["release"]["negative_flip_rate"] = compared["flips"]["negative_flip_rate"]
        tasks.append(task)
    return json_safe({"version": version, "model_file": "model.onnx", "backbone": meta["backbone"],
                      "input": meta["input"], "waterdrop_version": meta["waterdrop_version"],
                      "precision": meta.get("precision", "fp32"), "lineage": meta.get("lineage"),
                      "tasks": tasks, "gate": None if comparison is None else comparison["gate"],
                      "compared_with": None if comparison is None else comparison["deployed"],
                      "added": comparison["added"] if comparison else [],
                      "retired": comparison["retired"] if comparison else [], "forced": forced})


def card_markdown(card: dict, name: str) -> str:
    lines = [f"# {name}, version {card['version']}", "",
             f"- backbone {card['backbone']}, input {card['input']['size']} px RGB 0..255, {card['precision']}",
             f"- release gate: {card['gate'] or 'none (first version)'}"
             + (" (overridden with --force)" if card["forced"] else "")
             + (f", against {card['compared_with']}" if card["compared_with"] else "")]
    lineage = card.get("lineage") or {}
    if lineage.get("parent"):
        lines.append(f"- trained from the model {lineage['parent']['model_hash'][:12]}; changed tasks: "
                     f"{', '.join(lineage['changed']) or 'none'}; retired: {', '.join(lineage['retired']) or 'none'}")
    lines += ["", "| task | kind | labels | threshold | data (images, sha256) | release |", "|---|---|---|---|---|---|"]
    for task in card["tasks"]:
        threshold = task.get("threshold", task.get("thresholds"))
        threshold = "per label" if isinstance(threshold, dict) else ("-" if threshold is None else f"{threshold:.3f}")
        data = "; ".join(f"{split} {d['images']} ({d['sha256'][:10]})" for split, d in task.get("data", {}).items())
        release = task.get("release", {})
        verdict = release.get("status", "-")
        if release.get("status") == "compared":
            verdict = (f"{release['metric']} {release['candidate']:.4f} ({release['difference']:+.4f} on "
                       f"{release['split']}), {release['verdict']}")
        lines.append(f"| {task['name']} | {task['kind']} | {', '.join(task['labels'])} | {threshold} | {data or '-'} "
                     f"| {verdict} |")
    return "\n".join(lines) + "\n"


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def latest_version(model_dir: Path) -> Path | None:
    version = next_version(model_dir) - 1
    return model_dir / str(version) / "model.onnx" if version else None


def publish(model_path: Path, repository: Path, name: str, cfg: RegistryConfig | None, comparison: dict | None,
            comparison_dir: Path | None, forced: bool, max_batch_size: int = 32) -> Path:
    """Copy a model into the next version of ``repository/name`` with its card, comparison and
    config, and (re)write the model's ``config.pbtxt``. Returns the version folder."""
    model_dir = repository / name
    config_text = triton_config(model_path, name, max_batch_size)  # before anything is written
    version = next_version(model_dir)
    card = model_card(model_path, cfg, comparison, version, forced)
    model_dir.mkdir(parents=True, exist_ok=True)
    # Built beside its place and renamed into it: Triton never sees a half-written version.
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    try:
        shutil.copy(model_path, staging / "model.onnx")
        if comparison_dir is not None:
            for report in [*comparison_dir.glob("compare.*"), *comparison_dir.glob("*.png")]:
                shutil.copy(report, staging / report.name)
        if cfg is not None:
            (staging / "resolved.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        (staging / "model_card.json").write_text(json.dumps(card, indent=2))
        (staging / "model_card.md").write_text(card_markdown(card, name))
        staging.rename(model_dir / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (model_dir / "config.pbtxt").write_text(config_text)
    return model_dir / str(version)
