"""Export a MultiTaskNet to one self-describing ONNX file and check it against PyTorch.

One named output per task output (``<task>.<key>``), a dynamic batch axis, and a JSON
metadata entry (``waterdrop``) with labels, thresholds, preprocessing and output names,
so the file alone is enough to serve it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from waterdrop import __version__
from waterdrop.config import RegistryConfig
from waterdrop.contract import EMBEDDING_OUTPUT, METADATA_KEY, metadata, output_name, outputs_of, task_entry
from waterdrop.engine.lifecycle import TaskPlan
from waterdrop.kinds import kind_of
from waterdrop.model.lineage import embedding_hash, model_hash, task_hashes
from waterdrop.model.multitask import MultiTaskNet

PARITY_TOLERANCE = 1e-4


class DeployGraph(nn.Module):
    """Every task's deploy outputs, plus the decisions its features make inside the graph at
    the chosen thresholds (a cascade's ``<task>.decision``: both networks at or above it), and
    the image embedding (``embedding``).

    The branched levels run once per task, not on the stacked batch (``forward_all`` with
    ``stack_tasks=False``): onnxruntime then folds every BatchNorm into its convolution, in
    fp32 and in int8 (see ``waterdrop.quantize``).

    With ``cams`` the class activation maps are outputs too (``forward_all`` with ``cams``).
    """

    def __init__(self, net: MultiTaskNet, thresholds: dict, cams: bool = False):
        super().__init__()
        self.net = net
        self.cams = cams
        self.thresholds = dict(thresholds)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.net.forward_all(image, stack_tasks=False, cams=self.cams, embedding=True)
        for name in self.net.task_names:
            predictions = {key: outputs[output] for key, output in outputs_of(name, list(outputs)).items()}
            for feature in self.net.features.values():
                decided = feature.graph_decisions(name, predictions, self.thresholds[name])
                outputs.update((output_name(name, key), value) for key, value in decided.items())
        return outputs


class _Ordered(nn.Module):
    # The attribute must not be called "graph": torch.export's FX module owns that name.
    def __init__(self, deploy: DeployGraph, output_names: list[str]):
        super().__init__()
        self.deploy, self.output_names = deploy, output_names

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.deploy(image)
        return tuple(outputs[name] for name in self.output_names)


def cam_metadata(net: MultiTaskNet, name: str, output_shapes: dict[str, tuple]) -> dict | None:
    """The ``cam`` entry of one task: output name, layout, map size and feature stride, and the
    same of its features' own maps (a cascade's second network's under ``stage2``). None when
    the head gives no map."""
    if output_name(name, "cam") not in output_shapes:
        return None

    def describe(output: str, stride: int) -> dict:
        shape = output_shapes[output]
        return {"output": output, "shape": "(N, labels, h, w)" if len(shape) == 4 else "(N, h, w)",
                "size": list(shape[-2:]), "stride": stride}

    entry = {**describe(output_name(name, "cam"), net.trunk.reductions[-1]), "meaning": net.heads[name].cam_meaning,
             "values": "raw, not normalised; an overlay takes the ReLU, divides by the maximum, resizes to the "
                       "image"}
    for feature in net.features.values():
        for key, (output, stride) in feature.extra_cams(name).items():
            if output_name(name, output) in output_shapes:
                entry[key] = describe(output_name(name, output), stride)
    return entry


def lineage_entry(hashes: dict[str, str], plan: dict | None) -> dict:
    """Where the model comes from: its hash, its parent's (a run trained ``--from`` it; None for a
    model trained from scratch), each task's status and which tasks differ from the parent."""
    if plan is None:
        return {"model_hash": model_hash(hashes), "parent": None, "changed": list(hashes), "retired": [],
                "status": dict.fromkeys(hashes, "trained")}
    plan = TaskPlan.from_dict(plan)
    return {"model_hash": model_hash(hashes),
            "parent": {"checkpoint": plan.parent, "model_hash": model_hash(plan.parent_hashes)},
            "changed": plan.changed(hashes), "retired": plan.retired,
            "status": {name: plan.status(name) for name in hashes}}


def build_metadata(net: MultiTaskNet, cfg: RegistryConfig, thresholds: dict, output_names: list[str],
                   output_shapes: dict[str, tuple] | None = None, lineage: dict | None = None) -> dict:
    """The ``waterdrop`` metadata entry. ``output_shapes`` (of an example batch) is needed only
    for the class activation map outputs; with them every task gets a ``cam`` entry (null where
    its head gives no map). ``lineage``: the plan of a run trained from a parent (checkpoint
    meta ``lineage``); every task gets its content ``hash`` either way."""
    with_cams = any(n.endswith(".cam") for n in output_names)
    hashes = task_hashes(net, cfg)
    tasks = []
    for task in cfg.tasks:
        head = net.heads[task.name]
        entry = task_entry(task.name, kind_of(head.kind), task.head_type, task.labels, task.negative_label,
                           outputs_of(task.name, output_names), thresholds[task.name],
                           {"prevalence": task.deploy.prevalence, task.deploy.target_metric: task.deploy.target_value},
                           task.relations.to_dict() if task.relations else None)
        entry["hash"] = hashes[task.name]
        if with_cams:
            entry["cam"] = cam_metadata(net, task.name, output_shapes)
        task_shapes = {key: (output_shapes or {}).get(name) for key, name in entry["outputs"].items()}
        for key, feature in net.features.items():
            described = feature.metadata(task.name, task_shapes)
            if described is not None:
                entry[key] = described
        tasks.append(entry)
    described = metadata(tasks, cfg.model.backbone, cfg.model.input_size, cfg.model.mean, cfg.model.std, __version__)
    return {**described, "lineage": lineage_entry(hashes, lineage),
            "embedding": embedding_entry(net, cfg, output_shapes)}


def embedding_entry(net: MultiTaskNet, cfg: RegistryConfig, output_shapes: dict[str, tuple] | None) -> dict:
    """The ``embedding`` entry: its output, size, what it is made of, and its hash (a pool index
    refuses queries and shards of another embedding)."""
    levels = net.embedding_levels()
    source = (f"shared trunk levels {levels}: each average-pooled and L2-normalised, joined" if levels else
              "every task's deepest level: average-pooled, L2-normalised, averaged over tasks")
    dim = (output_shapes or {}).get(EMBEDDING_OUTPUT, (0, sum(net.channels[level] for level in levels)))[-1]
    return {"output": EMBEDDING_OUTPUT, "dim": int(dim), "source": source, "levels": levels, "normalised": "L2",
            "similarity": "inner product = cosine", "hash": embedding_hash(net, cfg)}


def _check_dynamic_batch(model: onnx.ModelProto) -> None:
    """The exporter can silently fix the batch size; refuse such a file."""
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.dim_param:
            raise RuntimeError(f"ONNX {value.name}: batch axis was fixed to {dim.dim_value} during export")


def _unshare_convolutions(model: onnx.ModelProto) -> int:
    """Give every BatchNorm a convolution of its own, so that onnxruntime folds it in.

    Every task's first convolution of the branched levels reads the same input with the same
    weights; the exporter merges them into one, whose output then feeds every task's BatchNorm,
    and onnxruntime folds a BatchNorm only into a convolution that nothing else reads. Such a
    convolution is copied once per further BatchNorm, each copy with its own copy of the weights
    (onnxruntime would merge copies that share them again). Returns how many copies were made.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    copies = 0
    for conv in [node for node in model.graph.node if node.op_type == "Conv" and node.input[1] in weights]:
        norms = readers.get(conv.output[0], [])
        if len(norms) < 2 or any(norm.op_type != "BatchNormalization" for norm in norms):
            continue
        position = list(model.graph.node).index(conv)
        for k, norm in enumerate(norms[1:], 1):
            weight, twin = onnx.TensorProto(), onnx.NodeProto()
            weight.CopyFrom(weights[conv.input[1]])
            twin.CopyFrom(conv)
            weight.name, twin.name = f"{conv.input[1]}.copy{k}", f"{conv.name}.copy{k}"
            twin.input[1], twin.output[0] = weight.name, f"{conv.output[0]}.copy{k}"
            model.graph.initializer.append(weight)
            model.graph.node.insert(position + k, twin)
            norm.input[0] = twin.output[0]
            copies += 1
    return copies


def check_parity(path: Path, graph: DeployGraph, size: int, batch_sizes=(1, 3), seed: int = 0) -> dict[str, float]:
    """Max abs difference between onnxruntime and PyTorch for every output at each batch size
    (for boolean outputs: the fraction of disagreeing entries)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(seed)
    worst = {name: 0.0 for name in names}
    for batch in batch_sizes:
        image = rng.integers(0, 256, (batch, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            expected = graph(torch.from_numpy(image))
        got = session.run(names, {"image": image})
        for name, value in zip(names, got):
            if value.shape != tuple(expected[name].shape):
                raise RuntimeError(f"{name}: ONNX shape {value.shape} != PyTorch {tuple(expected[name].shape)}")
            reference = expected[name].numpy()
            diff = (value != reference).mean() if value.dtype == bool else np.abs(value - reference).max()
            worst[name] = max(worst[name], float(diff))
    return worst


def export_onnx(net: MultiTaskNet, cfg: RegistryConfig, thresholds: dict, path: str | Path,
                opset: int = 18, cam: bool = False, lineage: dict | None = None) -> dict[str, float]:
    """Write the ONNX file, check it, and return the max abs difference per output.

    With ``cam`` the file also has every task's class activation map as ``<task>.cam`` (and its
    features' maps, e.g. a cascade's ``<task>.stage2_cam``), described in the metadata and
    checked for parity too. ``lineage``: the checkpoint's record of its parent (see
    ``build_metadata``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(net).eval().cpu()
    for feature in net.features.values():
        feature.fold_for_export()
    size = cfg.model.input_size
    example = torch.zeros(2, 3, size, size)
    missing = [t.name for t in cfg.tasks if t.name not in thresholds]
    if missing:
        raise ValueError(f"no threshold for tasks {missing}; run tools/eval.py first")
    graph = DeployGraph(net, thresholds, cams=cam).eval()
    with torch.no_grad():
        output_shapes = {name: tuple(value.shape) for name, value in graph(example).items()}
    output_names = list(output_shapes)
    torch.onnx.export(
        _Ordered(graph, output_names).eval(), (example,), str(path), input_names=["image"], output_names=output_names,
        dynamic_shapes={"image": {0: torch.export.Dim.DYNAMIC}}, opset_version=opset, dynamo=True,
        external_data=False, verbose=False)
    model = onnx.load(str(path))
    _check_dynamic_batch(model)
    _unshare_convolutions(model)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(build_metadata(net, cfg, thresholds, output_names, output_shapes,
                                                                     lineage))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    parity = check_parity(path, graph, size)
    bad = {k: v for k, v in parity.items() if not v <= PARITY_TOLERANCE}
    if bad:
        raise RuntimeError(f"ONNX and PyTorch disagree by more than {PARITY_TOLERANCE}: {bad}")
    return parity
