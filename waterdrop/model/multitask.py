"""The multi-task network: trunk once, per-task BN branches, one head per task."""

from __future__ import annotations

import torch
from torch import nn

from waterdrop.config import ConfigError, RegistryConfig
from waterdrop.model.task_bn import TaskRouting, branch_norms
from waterdrop.model.trunk import Trunk
from waterdrop.registry import registered_heads


class MultiTaskNet(nn.Module):
    """Shared trunk + per-task BatchNorm in the configured levels + one head per task.

    Inputs are RGB images, float or uint8 in 0..255, NCHW at the configured size;
    normalisation happens inside, so the exported graph carries it too.

    Two ways through:

    * ``forward_tasks(images, task_index)``: each sample goes through its own task only
      (training and validation); returns raw head outputs per task present in the batch.
    * ``forward_all(images)``: every image through every task in one graph (inference and
      ONNX export); returns the deploy outputs as ``{"<task>.<key>": tensor}``.
    """

    def __init__(self, cfg: RegistryConfig):
        super().__init__()
        model = cfg.model
        self.task_names = cfg.task_names
        try:
            self.trunk = Trunk(model.backbone, model.pretrained, model.cbam)
        except ValueError as err:
            raise ConfigError(cfg.file, "model", str(err)) from err
        levels = len(self.trunk.levels)
        bad = [s for s in model.task_bn_stages if not -levels <= s < levels]
        if bad:
            raise ConfigError(cfg.file, "model.task_bn_stages",
                              f"got {bad}; {model.backbone} has feature levels 0..{levels - 1} (or -1..-{levels})")
        branched = sorted({s % levels for s in model.task_bn_stages})
        self.routing = TaskRouting(len(cfg.tasks))
        for level in branched:
            branch_norms(self.trunk.levels[level], self.routing)
        self.first_branched = branched[0] if branched else levels
        self.register_buffer("mean", torch.tensor(model.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(model.std).view(1, 3, 1, 1) * 255, persistent=False)
        head_classes = registered_heads()
        heads = {}
        for task in cfg.tasks:
            try:
                heads[task.name] = head_classes[task.head_type](
                    self.trunk.channels, task.labels, task.negative_label, **task.head_args)
            except (ValueError, TypeError) as err:
                raise ConfigError(task.file, "head", str(err)) from err
        self.heads = nn.ModuleDict(heads)

    def forward_features(self, images: torch.Tensor, task_index: torch.Tensor | None) -> list[torch.Tensor]:
        """Feature maps of every level. With ``task_index`` None the levels from the first
        branched one on hold ``num_tasks`` stacked copies of the batch."""
        self.routing.task_index = task_index
        x = (images.float() - self.mean) / self.std
        feats = []
        for level in range(len(self.trunk.levels)):
            if level == self.first_branched and task_index is None:
                x = x.unsqueeze(0).expand(len(self.task_names), *x.shape).flatten(0, 1)
            x = self.trunk.run_level(level, x)
            feats.append(x)
        return feats

    def forward_tasks(self, images: torch.Tensor, task_index: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Raw outputs per task, rows in batch order of that task's samples."""
        feats = self.forward_features(images, task_index)
        outputs = {}
        for t, name in enumerate(self.task_names):
            rows = (task_index == t).nonzero(as_tuple=True)[0]
            if rows.numel():
                outputs[name] = self.heads[name]([f[rows] for f in feats])
        return outputs

    def scores_and_truth(self, outputs: dict[str, dict[str, torch.Tensor]],
                         targets: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """Evaluation arrays per task (see ``Head.score_and_truth``) from ``forward_tasks`` outputs."""
        arrays = {}
        for name, out in outputs.items():
            head = self.heads[name]
            predictions = {k: v.detach().float().cpu().numpy() for k, v in head.predict(out).items()}
            arrays[name] = head.score_and_truth(predictions, targets[name].cpu().numpy())
        return arrays

    def forward_all(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Deploy outputs of every task for every image."""
        feats = self.forward_features(images, None)
        results = {}
        for t, name in enumerate(self.task_names):
            task_feats = [f if level < self.first_branched else f.unflatten(0, (len(self.task_names), -1))[t]
                          for level, f in enumerate(feats)]
            head = self.heads[name]
            for key, value in head.predict(head(task_feats)).items():
                results[f"{name}.{key}"] = value
        return results
