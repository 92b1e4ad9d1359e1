"""Loading checkpoints with ``weights_only=True``.

mmengine checkpoints also hold its message hub (HistoryBuffer) and a few numpy objects,
which torch's weights-only unpickler refuses; exactly those are allow-listed, nothing more.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

from waterdrop.config import RegistryConfig, load_registry
from waterdrop.model.multitask import MultiTaskNet

_ALLOWED = [HistoryBuffer, np.ndarray, np.dtype, np.core.multiarray._reconstruct if hasattr(np, "core") else None,
            type(np.dtype(np.float64)), type(np.dtype(np.float32)), type(np.dtype(np.int64)),
            np.float64, np.float32, np.int64]


def allow_mmengine_checkpoints() -> None:
    torch.serialization.add_safe_globals([g for g in _ALLOWED if g is not None]
                                         + [np._core.multiarray._reconstruct, np._core.multiarray.scalar])


def load_checkpoint(path: str | Path) -> dict:
    allow_mmengine_checkpoints()
    return torch.load(path, map_location="cpu", weights_only=True)


def load_net(checkpoint_path: str | Path, registry: str | Path | None = None) -> tuple[MultiTaskNet, RegistryConfig, dict]:
    """Rebuild the network of a training checkpoint; the registry defaults to the one it was trained with."""
    checkpoint = load_checkpoint(checkpoint_path)
    meta = checkpoint.get("meta", {}).get("waterdrop", {})
    registry = registry or meta.get("registry")
    if registry is None:
        raise ValueError(f"{checkpoint_path}: no registry recorded in the checkpoint; pass --registry")
    cfg = load_registry(registry)
    if meta.get("task_names") and meta["task_names"] != cfg.task_names:
        raise ValueError(f"{checkpoint_path} was trained on tasks {meta['task_names']}, but {registry} "
                         f"lists {cfg.task_names}")
    net = MultiTaskNet(cfg)
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()}
    net.load_state_dict(state)
    return net.eval(), cfg, meta
