"""The multi-task network: trunk once, per-task BN branches, one head per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from waterdrop.config import ConfigError, RegistryConfig, blamed_on
from waterdrop.config.schema import check_levels
from waterdrop.contract import EMBEDDING_OUTPUT, output_name
from waterdrop.features.base import build_features, rename_old_keys
from waterdrop.model.head import mixed_terms
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

    ``features`` holds the per-task features that are part of the network (a cascade's second
    network, detector assist, loss prediction; see ``waterdrop.features``): they add outputs
    from the task's own feature maps (its BN branch), change its predictions and add deploy
    outputs.

    With ``model.fusion`` a second backbone (``fusion``, with its own normalisation) runs on the
    image, and its deepest feature map (resized to the trunk's where the strides differ) is
    joined channel-wise to the trunk's deepest level: the heads read both (a fusion model,
    e.g. a teacher for distillation). It has no per-task BatchNorm. ``channels`` are the
    feature levels' channels as the heads see them.
    """

    def __init__(self, cfg: RegistryConfig):
        super().__init__()
        model = cfg.model
        self.task_names = cfg.task_names
        with blamed_on(cfg.file, "model"):
            self.trunk = Trunk(model.backbone, model.pretrained, model.cbam, model.head_conv)
        levels = len(self.trunk.levels)
        self.fusion = None
        self.channels = list(self.trunk.channels)
        if model.fusion is not None:
            with blamed_on(cfg.file, "model.fusion"):
                self.fusion = Trunk(model.fusion.backbone, model.fusion.pretrained)
            self.channels[-1] += self.fusion.channels[-1]
            self.register_buffer("fusion_mean", torch.tensor(model.fusion.mean).view(1, 3, 1, 1) * 255,
                                 persistent=False)
            self.register_buffer("fusion_std", torch.tensor(model.fusion.std).view(1, 3, 1, 1) * 255,
                                 persistent=False)
        with blamed_on(cfg.file, "model.task_bn_stages"):
            branched = sorted(set(check_levels(model.task_bn_stages, levels))) if model.task_bn_stages else []
        self.routing = TaskRouting(len(cfg.tasks))
        self.first_branched = branched[0] if branched else levels
        # With model.task_bn_blocks only the last blocks of the first branched level are per task.
        self.shared_blocks = 0
        if branched and model.task_bn_blocks:
            blocks = self.trunk.blocks(self.first_branched)
            if model.task_bn_blocks > len(blocks):
                raise ConfigError(cfg.file, "model.task_bn_blocks", f"level {self.first_branched} of {model.backbone} "
                                  f"has {len(blocks)} blocks, not {model.task_bn_blocks}")
            if any(isinstance(block, nn.BatchNorm2d) for block in blocks):
                raise ConfigError(cfg.file, "model.task_bn_blocks", f"level {self.first_branched} of {model.backbone} "
                                  "has a bare BatchNorm among its blocks; branch the whole level (null)")
            self.shared_blocks = len(blocks) - model.task_bn_blocks
        #: The modules that run once per task: their BatchNorms have one copy per task.
        self.branched = [module for level in branched
                         for module in (self.trunk.blocks(level)[self.shared_blocks:] if level == branched[0]
                                        and self.shared_blocks else [self.trunk.levels[level]])]
        for module in self.branched:
            branch_norms(module, self.routing)
        self.register_buffer("mean", torch.tensor(model.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(model.std).view(1, 3, 1, 1) * 255, persistent=False)
        head_classes = registered_heads()
        heads = {}
        for task in cfg.tasks:
            with blamed_on(task.file, "head"):
                heads[task.name] = head_classes[task.head_type](self.channels, task.labels, task.negative_label,
                                                                **task.head_args)
        self.heads = nn.ModuleDict(heads)
        self.features = build_features(cfg, self, part_of_network=True)
        self.register_load_state_dict_pre_hook(self._rename_old_keys)

    def _rename_old_keys(self, module, state, prefix, *_) -> None:
        rename_old_keys(self.features, state, prefix)

    def backbones(self) -> list[nn.Module]:
        """The shared feature extractors: the trunk, and the fusion backbone where there is one."""
        return [self.trunk] if self.fusion is None else [self.trunk, self.fusion]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def fusion_map(self, images: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """The fusion backbone's deepest feature map of ``images``, resized to ``size`` where its
        stride differs from the trunk's."""
        x = self.fusion((images.float() - self.fusion_mean) / self.fusion_std)[-1]
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def forward_features(self, images: torch.Tensor, task_index: torch.Tensor | None) -> list[torch.Tensor]:
        """Feature maps of every level. With ``task_index`` None the levels from the first
        branched one on hold ``num_tasks`` stacked copies of the batch."""
        self.routing.task_index = task_index
        x = self.normalize(images)
        feats = self.trunk(x, stop=self.first_branched)
        if self.first_branched < len(self.trunk.levels):
            x = self.trunk.first_blocks(feats[-1] if feats else x, self.first_branched, self.shared_blocks)
            if task_index is None:
                x = x.unsqueeze(0).expand(len(self.task_names), *x.shape).flatten(0, 1)
            feats += self.trunk(x, start=self.first_branched, done=self.shared_blocks)
        if self.fusion is not None:
            extra = self.fusion_map(images, feats[-1].shape[-2:])
            if task_index is None and self.first_branched < len(self.trunk.levels):  # a stacked batch
                extra = extra.unsqueeze(0).expand(len(self.task_names), *extra.shape).flatten(0, 1)
            feats[-1] = torch.cat([feats[-1], extra], dim=1)
        return feats

    def task_outputs(self, name: str, feats: list[torch.Tensor], images: torch.Tensor, complete: bool = True,
                     cams: bool = False) -> dict[str, torch.Tensor]:
        """Raw outputs of one task from its feature maps ``feats`` of ``images``: its head's and
        its features' (see ``TaskFeature.add_outputs``)."""
        outputs = self.heads[name](feats)
        for feature in self.features.values():
            feature.add_outputs(name, feats, images, outputs, complete, cams)
        return outputs

    def forward_tasks(self, images: torch.Tensor, task_index: torch.Tensor,
                      complete: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Raw outputs per task, rows in batch order of that task's samples. ``complete`` False
        (training) leaves out the outputs a feature computes on demand in its loss (a cascade's
        second network)."""
        feats = self.forward_features(images, task_index)
        outputs = {}
        for t, name in enumerate(self.task_names):
            rows = (task_index == t).nonzero(as_tuple=True)[0]
            if rows.numel():
                outputs[name] = self.task_outputs(name, [f[rows] for f in feats], images[rows], complete)
        return outputs

    def task_terms(self, name: str, outputs: dict[str, torch.Tensor], target: torch.Tensor, mix=None,
                   extras: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The task's own per-sample loss terms: its head's (mixed under cutmix, ``mix`` =
        ``(second_target, lam)``) and its features' (``TaskFeature.sample_terms``, from the
        loader's ``extras`` of the task's samples, e.g. ``boxes``)."""
        terms = mixed_terms(self.heads[name], outputs, target, mix)
        for feature in self.features.values():
            terms.update(feature.sample_terms(name, outputs, target, extras or {}))
        return terms

    def task_predictions(self, name: str, outputs: dict) -> dict[str, torch.Tensor]:
        """Predictions of one task: its head's, as its features change them."""
        predictions = self.heads[name].predict(outputs)
        for feature in self.features.values():
            feature.adjust_predictions(name, outputs, predictions)
        return predictions

    def scores_and_truth(self, outputs: dict[str, dict[str, torch.Tensor]],
                         targets: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """Evaluation arrays per task (see ``Head.score_and_truth``) from ``forward_tasks`` outputs."""
        arrays = {}
        for name, out in outputs.items():
            predictions = {k: v.detach().float().cpu().numpy() for k, v in self.task_predictions(name, out).items()}
            arrays[name] = self.heads[name].score_and_truth(predictions, targets[name].cpu().numpy())
        return arrays

    def features_per_task(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """Each task's feature maps of every level, without stacking the batch: the levels before
        the first branched one run once, the others once per task on the batch itself, with every
        branched BatchNorm set to that task's copy."""
        x = self.normalize(images)
        shared = self.trunk(x, stop=self.first_branched)
        x = shared[-1] if shared else x
        if self.first_branched < len(self.trunk.levels):
            x = self.trunk.first_blocks(x, self.first_branched, self.shared_blocks)
        per_task, extra = [], None
        try:
            for t in range(len(self.task_names)):
                self.routing.task_index = t
                feats = shared + self.trunk(x, start=self.first_branched, done=self.shared_blocks)
                if self.fusion is not None:  # its map is the same for every task: computed once
                    extra = self.fusion_map(images, feats[-1].shape[-2:]) if extra is None else extra
                    feats[-1] = torch.cat([feats[-1], extra], dim=1)
                per_task.append(feats)
        finally:
            self.routing.task_index = None
        return per_task

    def embedding_levels(self) -> list[int]:
        """The feature levels whose pooled maps make the image embedding: the shared levels but
        the stem (none where fewer than two levels are shared; see ``embedding``)."""
        return list(range(1, self.first_branched))

    def embedding(self, per_task: list[list[torch.Tensor]]) -> torch.Tensor:
        """The image embedding (N, dim), L2-normalised, from every task's feature maps.

        Each shared level's map is average-pooled and L2-normalised, the levels are joined and
        normalised again: the shared trunk serves a task it was never trained for better than
        a task's own branch, and stays the same while tasks are trained on a frozen trunk
        (RESULTS.md, retrieval.py). Without shared levels: the tasks' deepest maps, pooled,
        normalised and averaged."""
        levels = self.embedding_levels()
        if levels:
            parts = [F.normalize(per_task[0][level].float().mean(dim=(2, 3)), dim=1) for level in levels]
        else:
            deepest = [F.normalize(feats[-1].float().mean(dim=(2, 3)), dim=1) for feats in per_task]
            parts = [torch.stack(deepest).mean(0)]
        return F.normalize(torch.cat(parts, dim=1), dim=1)

    def forward_all(self, images: torch.Tensor, stack_tasks: bool = True,
                    cams: bool = False, embedding: bool = False) -> dict[str, torch.Tensor]:
        """Deploy outputs of every task for every image: its predictions and its features' further
        outputs (e.g. ``<task>.predicted_loss``). With ``cams`` also ``<task>.cam`` for every task
        whose head gives a class activation map (``Head.cam``), and its features' own maps. With
        ``embedding`` also the image embedding (``embedding``).

        ``stack_tasks`` True: the levels from the first branched one run once, on the batch
        stacked once per task (``forward_features``). False: they run once per task on the batch
        itself (``features_per_task``); the same outputs. The ONNX export takes the second form:
        there each branched BatchNorm directly follows its convolution, so onnxruntime folds it
        into the convolution's weights, which it cannot do across the stacked batch's split.
        """
        if stack_tasks:
            feats, count = self.forward_features(images, None), len(self.task_names)
            per_task = [[f if level < self.first_branched else f.unflatten(0, (count, -1))[t]
                         for level, f in enumerate(feats)] for t in range(count)]
        else:
            per_task = self.features_per_task(images)
        results = {}
        for name, task_feats in zip(self.task_names, per_task):
            outputs = self.task_outputs(name, task_feats, images, cams=cams)
            deployed = self.task_predictions(name, outputs)
            for feature in self.features.values():
                deployed.update(feature.deploy_outputs(name, outputs))
            cam = self.heads[name].cam(task_feats) if cams else None
            if cam is not None:
                deployed["cam"] = cam
            results.update((output_name(name, key), value) for key, value in deployed.items())
        if embedding:
            results[EMBEDDING_OUTPUT] = self.embedding(per_task)
        return results
