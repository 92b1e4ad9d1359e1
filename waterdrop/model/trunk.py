"""The shared trunk: a timm CNN cut into feature levels that run one after another."""

from __future__ import annotations

import functools
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from timm.models import EfficientNet, EfficientNetFeatures, FeatureListNet, MobileNetV3Features, load_state_dict
from torch import nn

from waterdrop.model.cbam import CBAM
from waterdrop.model.pretrained import load_packaged
from waterdrop.weights import IMAGENET


def _ordered_children(features: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[int]]:
    """Children in execution order, and the position after which each feature level is taken
    (from timm's public ``feature_info``)."""
    taken_after = [name.replace(".", "_") for name in features.feature_info.module_name()]
    if isinstance(features, FeatureListNet):
        children = list(features.items())
        names = [name for name, _ in children]
        return children, [names.index(n) for n in taken_after]
    if isinstance(features, (EfficientNetFeatures, MobileNetV3Features)):
        stem = [(n, getattr(features, n)) for n in ("conv_stem", "bn1", "act1") if hasattr(features, n)]
        blocks = [(f"blocks_{i}", b) for i, b in enumerate(features.blocks)]
        names = [name for name, _ in stem + blocks]
        # A level taken inside the stem is the whole stem's output.
        return stem + blocks, [names.index(n) if n.startswith("blocks_") else len(stem) - 1 for n in taken_after]
    raise ValueError(f"{type(features).__name__} feature extractors are not supported; use a CNN that timm "
                     "builds as FeatureListNet or EfficientNetFeatures (resnet, resnext, densenet, mobilenet, "
                     "efficientnet)")


def load_beside_cbam(features: nn.Module, path: Path) -> None:
    """Load a plain weights file into a trunk with CBAM inside its blocks: the CBAM
    parameters, and only they, may be missing from the file (classifier weights in it are
    ignored). Raises RuntimeError naming the first other missing key."""
    state = load_state_dict(str(path))  # timm's reader: safetensors, wrapped and DDP-prefixed files
    attention = {f"{name}.{param}" for name, module in features.named_modules() if isinstance(module, CBAM)
                 for param, _ in module.named_parameters()}
    missing = [key for key in features.load_state_dict(state, strict=False).missing_keys if key not in attention]
    if missing:
        raise RuntimeError(f"{len(missing)} trunk tensors are not in the file, first '{missing[0]}' (only the CBAM "
                           "parameters may be missing)")


class HeadConv(nn.Module):
    """The pretrained 1x1 convolution, BatchNorm and activation that EfficientNet-family models
    run after their last block and before pooling (320 -> 1280 channels at lite0), kept as one
    block so that ``model.task_bn_blocks`` counts it as one."""

    def __init__(self, conv: nn.Module, norm: nn.Module):
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


@functools.cache
def has_head_conv(backbone: str) -> bool:
    """Whether ``backbone`` has a head convolution before pooling, which ``head_conv`` can keep (timm
    builds MobileNetV3 apart: its conv_head runs after pooling, on the pooled vector). Built on the
    meta device: no weights, no memory, no draw from the random generator."""
    with torch.device("meta"):
        return isinstance(timm.create_model(backbone, features_only=True), EfficientNetFeatures)


def resolved_head_conv(backbone: str, head_conv: bool | str) -> bool:
    """``model.head_conv`` as built: ``"auto"`` is whether the backbone has one."""
    return has_head_conv(backbone) if head_conv == "auto" else bool(head_conv)


class Trunk(nn.Module):
    """A timm CNN as a list of feature levels (level 0 is the stem, the last is the deepest).

    This builder owns the backbone choices in one place:

    * ``pretrained`` is a local weights file for the full timm model (classifier weights are
      ignored), or ``"imagenet"`` for the ImageNet weights that ship in a Python package
      (``tf_efficientnet_lite0/1/2``, see ``waterdrop.model.pretrained``); nothing is ever
      downloaded.
    * ``cbam="blocks"`` puts CBAM inside every residual block (timm ResNet-family only);
      ``cbam="stages"`` puts one CBAM after every level but the stem; ``"none"`` adds nothing.
    * ``head_conv`` ends the deepest level with the backbone's own pretrained head convolution
      (``HeadConv``), as timm's ``forward_features`` does (``features_only`` drops it): ``True``
      refuses a backbone without one before pooling (ResNet, DenseNet, MobileNetV3), ``"auto"``
      takes it where the backbone has one.

    Args:
        backbone: timm model name.
        pretrained: local weights file, "imagenet", or None for random initialisation.
        cbam: "none", "blocks" or "stages".
        head_conv: True, False or "auto": keep the head convolution (EfficientNet, MobileNetV2,
            MNASNet families). ``self.head_conv`` says whether it was kept.
    """

    def __init__(self, backbone: str, pretrained: Path | str | None = None, cbam: str = "none",
                 head_conv: bool | str = False):
        super().__init__()
        if backbone not in timm.list_models():
            raise ValueError(f"unknown timm backbone '{backbone}'")
        kwargs: dict = {"features_only": True}
        if cbam == "blocks":
            if not backbone.startswith(("resnet", "resnext", "seresnext", "test_resnet")):
                raise ValueError(f"cbam: blocks needs a ResNet-family backbone, not '{backbone}'; use cbam: stages")
            kwargs["block_args"] = {"attn_layer": CBAM}
        local_file = pretrained is not None and pretrained != IMAGENET
        if local_file and cbam != "blocks":
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)})
        try:
            features = timm.create_model(backbone, **kwargs)
            if local_file and cbam == "blocks":
                load_beside_cbam(features, Path(pretrained))
        except RuntimeError as err:
            raise ValueError(f"could not load pretrained weights from {pretrained}: {err}") from err
        head_conv = self.head_conv = resolved_head_conv(backbone, head_conv)
        if head_conv and not has_head_conv(backbone):
            raise ValueError(f"head_conv: true needs a backbone with a head convolution before pooling (the "
                             f"EfficientNet, MobileNetV2, MNASNet families), and {backbone} has none; set it false")
        whole = timm.create_model(backbone) if head_conv or pretrained == IMAGENET else None
        if pretrained == IMAGENET:
            mapped = load_packaged(backbone, whole.state_dict())
            own = features.state_dict()
            features.load_state_dict({k: v for k, v in mapped.items() if k in own})
            if head_conv:
                whole.load_state_dict(mapped)
        elif local_file and head_conv:
            self._load_head_conv(whole, Path(pretrained))
        children, ends = _ordered_children(features)
        self.channels: list[int] = features.feature_info.channels()
        if head_conv:
            children.insert(ends[-1] + 1, ("head_conv", HeadConv(whole.conv_head, whole.bn2)))
            ends[-1] += 1
            self.channels[-1] = whole.num_features
        self.reductions: list[int] = features.feature_info.reduction()
        levels, start = [], 0
        for end in ends:
            level = OrderedDict((name.replace(".", "_"), child) for name, child in children[start:end + 1])
            levels.append(nn.Sequential(level))
            start = end + 1
        self.levels = nn.ModuleList(levels)
        self.attention = nn.ModuleList(
            CBAM(c) if cbam == "stages" and i > 0 else nn.Identity() for i, c in enumerate(self.channels))

    @staticmethod
    def _load_head_conv(whole: EfficientNet, path: Path) -> None:
        head = {k: v for k, v in load_state_dict(str(path)).items() if k.startswith(("conv_head.", "bn2."))}
        try:
            missing = whole.load_state_dict(head, strict=False).missing_keys
        except RuntimeError as err:  # a shape mismatch: weights of another model
            raise ValueError(f"could not load the head convolution from {path}: {err}") from err
        if any(k.startswith(("conv_head.", "bn2.")) for k in missing):
            raise ValueError(f"{path} has no head convolution (conv_head, bn2) for head_conv (auto takes it where "
                             "the backbone has one); set head_conv: false or use weights of the whole model")

    def blocks(self, level: int) -> list[nn.Module]:
        """A level's blocks in order (its sequential children opened one step), so that a level can
        be split: the first blocks shared, the last ones per task (``model.task_bn_blocks``)."""
        return [block for child in self.levels[level]
                for block in (child if isinstance(child, nn.Sequential) else [child])]

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None, done: int = 0) -> list[torch.Tensor]:
        """Feature maps of levels ``start`` to ``stop`` (exclusive; None: the deepest included),
        ``x`` being the input of level ``start``: the normalised image for level 0, else the
        map of level ``start - 1``; with ``done`` the output of that level's first ``done``
        blocks (``first_blocks``)."""
        maps = []
        for level, attention in list(zip(range(len(self.levels)), self.attention))[start:stop]:
            for block in self.blocks(level)[done if level == start else 0:]:
                x = block(x)
            x = attention(x)
            maps.append(x)
        return maps

    def first_blocks(self, x: torch.Tensor, level: int, count: int) -> torch.Tensor:
        """The output of the first ``count`` blocks of ``level`` (see ``forward``'s ``done``)."""
        for block in self.blocks(level)[:count]:
            x = block(x)
        return x
