"""Residual adapters (Rebuffi et al., "Efficient parametrization of multi-domain deep neural
networks", CVPR 2018): a task's own 1x1 convolution beside every convolution of the branched
levels, so that a task added to a trained model is not capped by a frozen trunk.

The adapter of a convolution adds to the centre tap of its kernel: for a depthwise or grouped
convolution a per-channel (per group member) weight, for the others a low-rank matrix
``up @ down`` (LoRA-style, ``up`` starts at zero so a new task starts exactly as without
adapters). The task's convolution is then one convolution with weights ``W + delta``, which is
what the export writes: each task already runs its own folded copy of the branched levels, so
an adapter costs no inference time, only its weights.

The shared weights stay shared and under their own names (``TaskConv`` holds them as the
wrapped convolution did), and a task without adapters runs the very convolution it ran before:
its outputs do not change when another task gains adapters.

Settings (task YAML ``adapters``, ``waterdrop.config.schema.AdapterConfig``): ``rank`` of the
low-rank adapters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from waterdrop.config import RegistryConfig
from waterdrop.features.base import TaskFeature, register_feature
from waterdrop.model.task_bn import TaskRouting


class ConvAdapter(nn.Module):
    """The weight change one task makes to one convolution (``delta``), at its kernel's centre."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        super().__init__()
        out, per_group, *self.kernel = conv.weight.shape
        if conv.groups > 1:
            self.full = nn.Parameter(torch.zeros(out, per_group))
        else:
            rank = min(rank, out, per_group)
            self.up = nn.Parameter(torch.zeros(out, rank))
            self.down = nn.Parameter(torch.randn(rank, per_group) / math.sqrt(per_group))

    def delta(self) -> torch.Tensor:
        change = self.full if hasattr(self, "full") else self.up @ self.down
        height, width = self.kernel
        # Centre tap (top-left of the centre for an even kernel).
        return F.pad(change[..., None, None], ((width - 1) // 2, width // 2, (height - 1) // 2, height // 2))


class TaskConv(nn.Module):
    """A shared convolution plus per-task adapters, routed like ``TaskBatchNorm``.

    ``weight`` and ``bias`` are the wrapped convolution's own parameters (same names in the
    state dict as before wrapping). ``adapters`` maps a task's position to its ``ConvAdapter``;
    the adapters are registered in the feature that owns them, not here.
    """

    def __init__(self, conv: nn.Conv2d, routing: TaskRouting):
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self._conv = (conv,)  # a tuple hides it from the module tree: its parameters are ours
        self._routing = routing
        self.adapters: dict[int, ConvAdapter] = {}

    def fold(self) -> None:
        """Hold every task's ``W + delta`` as a constant (for export: one weight tensor per
        task, which onnxruntime folds its BatchNorm into and quantizes like any other)."""
        for t, adapter in self.adapters.items():
            self.register_buffer(f"folded_{t}", (self.weight + adapter.delta()).detach(), persistent=False)

    def _run(self, x: torch.Tensor, task: int | None) -> torch.Tensor:
        conv = self._conv[0]
        adapter = self.adapters.get(task)
        if adapter is None:
            return conv(x)
        weight = getattr(self, f"folded_{task}", None)
        weight = self.weight + adapter.delta() if weight is None else weight
        return torch.func.functional_call(conv, {"weight": weight}, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task_index = self._routing.task_index
        if isinstance(task_index, int) or not self.adapters:
            return self._run(x, task_index if isinstance(task_index, int) else None)
        if task_index is None:  # the stacked batch: chunk t is task t's
            chunks = x.unflatten(0, (self._routing.num_tasks, -1))
            return torch.cat([self._run(chunks[t], t) for t in range(self._routing.num_tasks)])
        parts, order = [], []
        plain = ~torch.isin(task_index, torch.tensor(list(self.adapters), device=task_index.device))
        groups = [(None, plain.nonzero(as_tuple=True)[0])]
        groups += [(t, (task_index == t).nonzero(as_tuple=True)[0]) for t in self.adapters]
        for task, rows in groups:
            if rows.numel():
                parts.append(self._run(x[rows], task))
                order.append(rows)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]


def _wrap_convolutions(module: nn.Module, routing: TaskRouting) -> list[TaskConv]:
    wrapped = []
    for name, child in module.named_children():
        if isinstance(child, TaskConv):
            wrapped.append(child)
        elif isinstance(child, nn.Conv2d):
            setattr(module, name, TaskConv(child, routing))
            wrapped.append(getattr(module, name))
        else:
            wrapped += _wrap_convolutions(child, routing)
    return wrapped


@register_feature
class ResidualAdapters(TaskFeature):
    key = "adapters"

    def __init__(self, cfg: RegistryConfig, net):
        super().__init__(cfg, net)
        if not net.branched:
            raise ValueError("adapters sit beside the convolutions of the branched levels; model.task_bn_stages "
                             "branches none")
        convs = [conv for block in net.branched for conv in _wrap_convolutions(block, net.routing)]
        self._convs = tuple(convs)
        for task, spec in self.settings.items():
            t = net.task_names.index(task)
            self.per_task[task] = nn.ModuleList(ConvAdapter(conv._conv[0], spec.rank) for conv in convs)
            for conv, adapter in zip(convs, self.per_task[task]):
                conv.adapters[t] = adapter

    def fold_for_export(self):
        for conv in self._convs:
            conv.fold()

    def metadata(self, task, output_shapes):
        if task not in self.per_task:
            return None
        return {"rank": self.settings[task].rank, "weights": sum(p.numel() for p in self.per_task[task].parameters()),
                "meaning": "residual adapters folded into the task's own convolutions of the branched levels"}
