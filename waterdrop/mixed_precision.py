"""Mixed precision for a QDQ int8 file, torch-free: which quantized activations cost the tasks
most, and the file with the fewest of them kept in fp32.

In a QDQ file every quantized activation ``T`` runs through a QuantizeLinear -> DequantizeLinear
pair. Dropping the pair hands ``T`` on in fp32; onnxruntime then cannot fuse the node that
makes ``T`` nor the nodes that read it into int8 kernels, so those run in fp32. The unit kept
in fp32 is therefore an activation, and the nodes around it follow.

Sensitivity is measured on unlabelled calibration images: for each activation alone, how much
closer the file's task outputs come to the fp32 file's (mean absolute difference of logits)
when that one activation stays fp32, relative to the all-int8 file's distance, averaged over
the tasks that matter. The search then keeps the top-ranked activations in fp32, more at each
step, until the caller's check passes, and bisects for the fewest.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime

from waterdrop.progress import Progress


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def quantized_activations(model: onnx.ModelProto) -> list[str]:
    """Activations with a QuantizeLinear -> DequantizeLinear pair, in graph order (weights,
    stored quantized, are not among them; nor a pair whose output the graph returns)."""
    graph = model.graph
    constants = {tensor.name for tensor in graph.initializer}
    returned = {output.name for output in graph.output}
    readers = _consumers(graph)
    found = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        dequantized = readers.get(node.output[0], [])
        if dequantized and all(d.op_type == "DequantizeLinear" and d.output[0] not in returned for d in dequantized):
            found.append(node.input[0])
    return found


def keep_fp32(model: onnx.ModelProto, fp32: onnx.ModelProto, activations: Sequence[str]) -> onnx.ModelProto:
    """A copy of the QDQ ``model`` in which ``activations`` skip their QuantizeLinear ->
    DequantizeLinear pair: every reader of the dequantized tensor reads the fp32 one.

    ``fp32`` must be the very file that was quantized (``waterdrop.quantize.prepare``: BatchNorm
    folded), matched by node name. From it come a Clip or Relu that onnxruntime's quantizer
    removed because the activation's quantized range did its clipping (an activation kept in
    fp32 is clipped as in fp32), and the fp32 weights of the nodes that now compute in fp32."""
    kept = copy.deepcopy(model)
    graph, wanted = kept.graph, set(activations)
    readers = _consumers(graph)
    dropped, renamed = set(), {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in wanted:
            dropped.add(id(node))
            for dequantize in readers.get(node.output[0], []):
                dropped.add(id(dequantize))
                renamed[dequantize.output[0]] = node.input[0]
    missing = wanted - set(renamed.values())
    if missing:
        raise ValueError(f"not quantized activations of this file: {sorted(missing)}")
    original_makers = {name: node for node in fp32.graph.node for name in node.output}
    constants = {tensor.name for tensor in graph.initializer}  # kept up to date as tensors are added
    fp32_constants = {tensor.name: tensor for tensor in fp32.graph.initializer}
    remaining = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        for position, name in enumerate(node.input):
            if name in renamed:
                node.input[position] = renamed[name]
        remaining.append(node)
        for position, name in enumerate(node.output):
            original = original_makers.get(name)
            if name in wanted and original is not None and original.op_type in ("Clip", "Relu") \
                    and node.op_type != original.op_type:
                restored = copy.deepcopy(original)
                node.output[position] = restored.input[0] = f"{name}.before_{original.op_type.lower()}"
                remaining.append(restored)
                for constant in restored.input[1:]:
                    if constant and constant not in constants:
                        graph.initializer.append(copy.deepcopy(fp32_constants[constant]))
                        constants.add(constant)
    _restore_fp32_weights(graph, remaining, fp32, wanted, constants, fp32_constants)
    del graph.node[:]
    graph.node.extend(remaining)
    # The pairs' scales and zero points, weights left for their fp32 originals: unused, and
    # onnxruntime would warn about each at every load.
    used = {name for node in graph.node for name in node.input}
    unused = [tensor for tensor in graph.initializer if tensor.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    return kept


def _restore_fp32_weights(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], fp32: onnx.ModelProto,
                          kept: set[str], constants: set[str], fp32_constants: dict[str, onnx.TensorProto]) -> None:
    """The nodes that now compute in fp32 (those making or reading a kept activation) take their
    fp32 weights back: they run in fp32 whatever their weights, so int8 weights would only add
    error. Their weights' DequantizeLinear nodes, unread, leave ``nodes``. ``constants``: the
    names of ``graph``'s initializers (grows with those added here)."""
    originals = {node.name: node for node in fp32.graph.node}
    makers = {name: node for node in nodes for name in node.output}
    for node in nodes:
        original = originals.get(node.name)
        if original is None or original.op_type != node.op_type or not any(
                name in kept or name.split(".before_")[0] in kept for name in [*node.input, *node.output]):
            continue
        for position, name in enumerate(node.input):
            maker = makers.get(name)
            if maker is not None and maker.op_type == "DequantizeLinear" and maker.input[0] in constants \
                    and position < len(original.input) and original.input[position] in fp32_constants:
                # A name of its own: the dequantized copy may carry the original's name.
                restored = node.input[position] = f"{original.input[position]}.fp32"
                if restored not in constants:
                    tensor = copy.deepcopy(fp32_constants[original.input[position]])
                    tensor.name = restored
                    graph.initializer.append(tensor)
                    constants.add(restored)
    read = {name for node in nodes for name in node.input} | {output.name for output in graph.output}
    nodes[:] = [node for node in nodes if node.op_type != "DequantizeLinear" or node.output[0] in read
                or node.input[0] not in constants]


def fp32_nodes(model: onnx.ModelProto, activations: Sequence[str], ops: Sequence[str]) -> list[dict]:
    """The quantized nodes of the QDQ ``model`` (of the quantized operator types ``ops``, reading
    a DequantizeLinear) that make or read ``activations``: they compute in fp32 once the
    activations skip quantization."""
    graph = model.graph
    makers = {name: node for node in graph.node for name in node.output}
    readers = _consumers(graph)

    def quantized(node: onnx.NodeProto) -> bool:
        return node.op_type in ops and any(
            makers.get(name) is not None and makers[name].op_type == "DequantizeLinear" for name in node.input)

    found: dict[str, str] = {}
    for name in activations:
        maker = makers.get(name)
        around = [maker] if maker is not None else []
        quantize = [n for n in readers.get(name, []) if n.op_type == "QuantizeLinear"]
        dequantized = [d.output[0] for q in quantize for d in readers.get(q.output[0], [])]
        around += [reader for name in dequantized for reader in readers.get(name, [])]
        found.update((node.name, node.op_type) for node in around if quantized(node))
    return [{"node": name, "op": op} for name, op in found.items()]


def conv_macs(fp32: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates per image of each Conv and Gemm of ``fp32`` (shapes from its
    inferred value_info, as ``waterdrop.quantize.prepare`` leaves them); nodes whose output
    shape is unknown are left out."""
    shapes = {info.name: [d.dim_value for d in info.type.tensor_type.shape.dim]
              for info in [*fp32.graph.value_info, *fp32.graph.output]}
    weights = {tensor.name: list(tensor.dims) for tensor in fp32.graph.initializer}
    macs = {}
    for node in fp32.graph.node:
        weight, out = weights.get(node.input[1]) if len(node.input) > 1 else None, shapes.get(node.output[0])
        if node.op_type in ("Conv", "Gemm") and weight and out and all(out[1:]):
            macs[node.name] = int(np.prod(weight)) * int(np.prod(out[2:]))  # Gemm: out[2:] is empty, 1
    return macs


def _session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _outputs(session: onnxruntime.InferenceSession, images: np.ndarray, names: list[str],
             batch_size: int) -> dict[str, np.ndarray]:
    """The named outputs of ``session`` on ``images`` (uint8 NCHW), ``batch_size`` at a time."""
    runs = [session.run(names, {"image": images[start:start + batch_size].astype(np.float32)})
            for start in range(0, len(images), batch_size)]
    return {name: np.concatenate([run[position] for run in runs]) for position, name in enumerate(names)}


def _logits(probabilities: np.ndarray) -> np.ndarray:
    clipped = np.clip(probabilities.astype(np.float64), 1e-6, 1 - 1e-6)
    return np.log(clipped) - np.log1p(-clipped)


def task_distances(session: onnxruntime.InferenceSession, images: np.ndarray, outputs: dict[str, str],
                   reference: dict[str, np.ndarray], batch_size: int = 32) -> dict[str, float]:
    """Per task, the mean absolute difference of the logits of its ``outputs`` (task -> output
    name) from ``reference``'s on ``images`` (uint8 NCHW)."""
    got = _outputs(session, images, list(outputs.values()), batch_size)
    return {task: float(np.abs(_logits(got[name]) - _logits(reference[name])).mean()) for task, name in outputs.items()}


ORDERS = ("gain", "gain_per_mac")


def rank_activations(int8: onnx.ModelProto, fp32: onnx.ModelProto, images: np.ndarray, outputs: dict[str, str],
                     focus: Sequence[str], ops: Sequence[str], batch_size: int = 32, order: str = "gain") -> list[dict]:
    """Every quantized activation of ``int8`` with its gain: how much of the all-int8 file's
    distance from ``fp32`` (see ``task_distances``) disappears when that activation alone stays
    fp32, relative per task and averaged over the ``focus`` tasks; and its cost, the share of
    the model's convolution MACs that then compute in fp32. ``order``: largest gain first, or
    largest gain per share of MACs (cheap activations first: fp32 costs speed by MACs)."""
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: one of {', '.join(ORDERS)}")
    macs = conv_macs(fp32)
    total = sum(macs.values()) or 1
    reference = _outputs(_session(fp32), images, list(outputs.values()), batch_size)
    base = task_distances(_session(int8), images, outputs, reference, batch_size)
    ranked = []
    candidates = quantized_activations(int8)
    with Progress("sensitivity: each quantized activation kept fp32 in turn", total=len(candidates),
                  unit="activations", announce=True) as meter:
        for name in candidates:
            distances = task_distances(_session(keep_fp32(int8, fp32, [name])), images, outputs, reference, batch_size)
            gains = [(base[task] - distances[task]) / base[task] if base[task] > 0 else 0.0 for task in focus]
            share = sum(macs.get(node["node"], 0) for node in fp32_nodes(int8, [name], ops)) / total
            ranked.append({"activation": name, "gain": float(np.mean(gains)), "mac_share": share})
            meter.update(1)
    if order == "gain":
        ranked.sort(key=lambda entry: -entry["gain"])
    else:  # a floor of 0.1 % of the MACs: an activation that costs nothing is not infinitely good
        ranked.sort(key=lambda entry: -entry["gain"] / max(entry["mac_share"], 1e-3))
    return ranked


def steps(limit: int) -> list[int]:
    """How many activations to try in fp32 at each step: 1, 2, 3, 4, 6, 8, 11, ... (x1.4), up to
    ``limit``."""
    counts, count = [], 1
    while count < limit:
        counts.append(count)
        count = max(count + 1, round(count * 1.4))
    return [*counts, limit] if limit > 0 else []


def fewest_in_fp32(ranked: Sequence[str], passes: Callable[[list[str]], bool],
                   limit: int) -> tuple[list[str] | None, list[int]]:
    """The fewest of the top ``ranked`` activations kept in fp32 for which ``passes`` holds,
    at most ``limit``: growing steps, then a bisection between the last failing and the first
    passing count (assuming more in fp32 does not fail where fewer passed). Returns the
    activations (None when even ``limit`` fails) and the counts tried, in order."""
    tried, below = [], 0
    for count in steps(min(limit, len(ranked))):
        tried.append(count)
        if passes(list(ranked[:count])):
            above = count
            break
        below = count
    else:
        return None, tried
    while above - below > 1:
        middle = (above + below) // 2
        tried.append(middle)
        if passes(list(ranked[:middle])):
            above = middle
        else:
            below = middle
    return list(ranked[:above]), tried
