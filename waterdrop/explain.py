"""Grad-CAM (Selvaraju et al., ICCV 2017): which regions of an image raise one task's score.

The gradient of the score with respect to a feature map, averaged over the map's positions,
weighs the map's channels; the ReLU of the weighted sum of channels is the map. It is
computed with ``torch.autograd.grad`` with respect to the feature map alone, so no
parameter receives a gradient, and in eval mode.

Each task is explained through its own path: its BatchNorm copies in the branched levels
(``net.routing.task_index``), CBAM where the trunk has it, and its head's own forward (a PCB
head's max over parts included). Stages 2 and on are the further networks its features
add to its decision (``TaskFeature.stages``, e.g. a cascade's second network): their own
trunk and head.

The class activation maps in the ONNX file (``Head.cam``) need no backward pass and no torch;
for a head that ends in global average pooling and a linear layer they equal Grad-CAM on the
deepest level up to that layer's bias and scale. Grad-CAM also explains other levels and any
target of ``Head.explain_targets``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from waterdrop.model.head import Head
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.model.trunk import Trunk


def normalize_maps(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (N, h, w) -> (N, H, W) in [0, 1]: ReLU, bilinear upsampling to ``size``, divided by
    each map's maximum (a map without positive values stays zero)."""
    maps = F.interpolate(F.relu(raw)[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return maps / maps.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)


def stage_count(net: MultiTaskNet, task: str) -> int:
    """How many networks take part in ``task``'s decision: its own, and its features' further ones."""
    return 1 + sum(len(feature.stages(task)) for feature in net.features.values())


def explained_parts(net: MultiTaskNet, task: str, stage: int = 1) -> tuple[Trunk, Head, int | None]:
    """The trunk, head and BatchNorm copy (task index; None for a further network's own trunk)
    that make ``task``'s decision at ``stage``.

    Raises:
        ValueError: an unknown task or stage.
    """
    if task not in net.heads:
        raise ValueError(f"unknown task '{task}'; known tasks: {', '.join(net.task_names)}")
    if stage == 1:
        return net.trunk, net.heads[task], net.task_names.index(task)
    further = [parts for feature in net.features.values() for parts in feature.stages(task)]
    if isinstance(stage, int) and 2 <= stage <= len(further) + 1:
        trunk, head = further[stage - 2]
        return trunk, head, None
    having = ", ".join(name for name in net.task_names if stage_count(net, name) >= stage) or "none"
    raise ValueError(f"task '{task}' has {len(further) + 1} stage(s), no stage {stage}; tasks with a stage "
                     f"{stage}: {having}")


def resolve_targets(head: Head, label: str | None = None) -> list[str | None]:
    """What to explain for one task: with ``label`` None or ``"all"`` every target (a binary
    task's decision and each sub-class, every tag, a graded score); else that label.

    Raises:
        ValueError: a label the head cannot explain; the message names those it can.
    """
    targets = head.explain_targets()
    if label in (None, "all"):
        return targets
    if label not in targets:
        raise _target_error(head, label)
    return [label]


def _target_error(head: Head, label: str | None) -> ValueError:
    targets = head.explain_targets()
    known = ", ".join(t for t in targets if t is not None) or "none"
    what = f"unknown label '{label}'" if label is not None else "no label given"
    decision = "; no label: its decision or score" if None in targets else ""
    return ValueError(f"{what} for this {head.kind} task; labels it explains: {known}{decision}")


def check_level(trunk: Trunk, level: int) -> int:
    """``level`` as an index from 0 (negative counts from the deepest).

    Raises:
        ValueError: not a level of ``trunk``.
    """
    count = len(trunk.levels)
    if isinstance(level, bool) or not isinstance(level, int) or not -count <= level < count:
        raise ValueError(f"level must be in 0..{count - 1} (or -1..-{count}), got {level!r}")
    return level % count


def _features(trunk: Trunk, x: torch.Tensor, level: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every level's feature map, the chosen level's as a leaf that requires a gradient; the
    levels up to it run without building a graph."""
    with torch.no_grad():
        early = trunk(x, stop=level + 1)
    chosen = early[-1].detach().requires_grad_(True)
    return early[:-1] + [chosen] + trunk(chosen, start=level + 1), chosen


def grad_cam(net: MultiTaskNet, images: torch.Tensor, task: str, target: str | None = None, stage: int = 1,
             level: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps of one task and target for a batch.

    Args:
        net: the network; it runs in eval mode (its mode is restored after).
        images: RGB NCHW in 0..255, uint8 or float, at the model's input size.
        task: task name.
        target: one of the head's ``explain_targets``: None for the binary decision (positive
            minus normal logit, P(positive) is its sigmoid) or the graded score; a sub-class
            of a binary task (its logit); a tag of a multi-label task (its logit).
        stage: 1, or 2 and on for the further networks of the task's features (a cascade's second).
        level: the feature level whose map is weighted (-1: the deepest).

    Returns:
        Maps (N, H, W) in [0, 1] at the input size, and the explained scores (N,).

    Raises:
        ValueError: an unknown task, target, stage or level.
    """
    return grad_cams(net, images, task, [target], stage, level)[0]


def grad_cams(net: MultiTaskNet, images: torch.Tensor, task: str, targets: list[str | None], stage: int = 1,
              level: int = -1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``grad_cam`` of several targets of one task: one forward pass, one backward pass each."""
    if torch.is_inference_mode_enabled():  # enable_grad() cannot lift it
        raise RuntimeError("Grad-CAM needs gradients: call it outside torch.inference_mode() (torch.no_grad() is fine)")
    trunk, head, task_index = explained_parts(net, task, stage)
    for target in targets:
        if target not in head.explain_targets():
            raise _target_error(head, target)
    level = check_level(trunk, level)
    training = net.training
    net.eval()
    net.routing.task_index = task_index
    try:
        with torch.enable_grad():
            feats, chosen = _features(trunk, net.normalize(images), level)
            if stage == 1 and net.fusion is not None:
                # The heads read the fusion backbone's map beside the trunk's; the map explains the trunk's part.
                feats[-1] = torch.cat([feats[-1], net.fusion_map(images, feats[-1].shape[-2:])], dim=1)
            outputs = head(feats)
            scores = [head.target_score(outputs, target) for target in targets]
            # Samples are independent in eval mode: the gradient of the sum is each one's own.
            gradients = [torch.autograd.grad(score.sum(), chosen, retain_graph=k + 1 < len(scores))[0]
                         for k, score in enumerate(scores)]
    finally:
        net.routing.task_index = None
        net.train(training)
    results = []
    for score, gradient in zip(scores, gradients):
        raw = (gradient.mean(dim=(2, 3), keepdim=True) * chosen.detach()).sum(dim=1)
        results.append((normalize_maps(raw, images.shape[-2:]), score.detach()))
    return results
