"""Per-task BatchNorm ("layer-4 BN branching").

Convolution weights stay shared; every task owns a copy of each BatchNorm in the branched
stages: its running statistics and its affine parameters. Tasks then stop pulling the
normalisation of the deep features in different directions while the trunk is paid once.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class TaskRouting:
    """Routing state shared by every TaskBatchNorm of one model during one forward.

    ``task_index`` set (a (N,) tensor): each sample goes through its own task's BN.
    ``task_index`` None: the batch is ``num_tasks`` equal chunks and chunk t uses task t's BN
    (inference: every image through every task, in one graph).
    ``task_index`` an int t: every sample goes through task t's BN, which is then a plain
    BatchNorm right after its convolution (the ONNX export runs each task this way, so that
    onnxruntime can fold the BatchNorms into the convolutions).
    """

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self.task_index: torch.Tensor | int | None = None


class TaskBatchNorm(nn.Module):
    """Wraps one BatchNorm (timm's BatchNormAct2d included) with one copy per task."""

    def __init__(self, norm: nn.Module, routing: TaskRouting):
        super().__init__()
        self.branches = nn.ModuleList(copy.deepcopy(norm) for _ in range(routing.num_tasks))
        self._routing = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task_index = self._routing.task_index
        if isinstance(task_index, int):
            return self.branches[task_index](x)
        if task_index is None:
            # unflatten, not chunk: chunk makes the ONNX exporter fix the batch size.
            chunks = x.unflatten(0, (len(self.branches), -1))
            return torch.cat([norm(chunks[t]) for t, norm in enumerate(self.branches)], dim=0)
        parts, order = [], []
        for t, norm in enumerate(self.branches):
            rows = (task_index == t).nonzero(as_tuple=True)[0]
            if rows.numel():
                parts.append(norm(x[rows]))
                order.append(rows)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]


def branch_norms(module: nn.Module, routing: TaskRouting) -> int:
    """Replace every BatchNorm2d inside ``module`` by a TaskBatchNorm; returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, TaskBatchNorm(child, routing))
            count += 1
        elif not isinstance(child, TaskBatchNorm):
            count += branch_norms(child, routing)
    return count
