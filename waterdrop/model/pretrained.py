"""Map packaged ImageNet weights (see ``waterdrop.weights``) onto timm's parameter names."""

from __future__ import annotations

import torch

from waterdrop.weights import packaged_weights_file


def map_state_dict(backbone: str, source: dict[str, torch.Tensor],
                   target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to the keys of ``target`` (a full timm model's state dict) by
    position. Every tensor of both sides must be used and shapes must agree pairwise; else a
    ValueError names the backbone and the first mismatch."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    for (src_key, src_value), (dst_key, dst_value) in zip(src, dst):
        if src_value.shape != dst_value.shape:
            raise ValueError(f"packaged weights for {backbone}: tensor '{src_key}' {tuple(src_value.shape)} does "
                             f"not fit '{dst_key}' {tuple(dst_value.shape)}")
    if len(src) != len(dst):
        first = src[len(dst)][0] if len(src) > len(dst) else dst[len(src)][0]
        raise ValueError(f"packaged weights for {backbone}: {len(src)} tensors in the file, {len(dst)} in the "
                         f"model; first one without a partner: '{first}'")
    return {dst_key: src_value for (_, src_value), (dst_key, _) in zip(src, dst)}


def load_packaged(backbone: str, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights of ``backbone`` under the keys of ``model_state``."""
    source = torch.load(packaged_weights_file(backbone), map_location="cpu", weights_only=True)
    return map_state_dict(backbone, source, model_state)
