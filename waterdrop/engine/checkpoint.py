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

# HistoryBuffer pickles its statistics methods as getattr(HistoryBuffer, "min"), hence
# getattr. The weights-only unpickler still refuses to call anything getattr returns unless
# that is allow-listed too, so this opens no way to run code.
_ALLOWED = [
    HistoryBuffer,
    getattr,
    np.ndarray,
    np.dtype,
    np._core.multiarray._reconstruct,
    np._core.multiarray.scalar,
    *(type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)),
]


def allow_mmengine_checkpoints() -> None:
    torch.serialization.add_safe_globals(_ALLOWED)


def load_checkpoint(path: str | Path) -> dict:
    allow_mmengine_checkpoints()
    return torch.load(path, map_location="cpu", weights_only=True)


def load_net(checkpoint_path: str | Path,
             registry: str | Path | None = None) -> tuple[MultiTaskNet, RegistryConfig, dict]:
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
    # With mean teacher the checkpoint holds student and teacher; the teacher is deployed.
    prefix = "teacher." if any(k.startswith("teacher.") for k in checkpoint["state_dict"]) else "net."
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state)
    return net.eval(), cfg, meta


def store_thresholds(checkpoint_path: str | Path, thresholds: dict) -> None:
    """Record the thresholds chosen by eval in the checkpoint, so export finds them there."""
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint.setdefault("meta", {}).setdefault("waterdrop", {})["thresholds"] = thresholds
    torch.save(checkpoint, checkpoint_path)


class RunFolderError(ValueError):
    """A run folder holds something that would mix two runs."""


def check_run_folder(work_dir: Path, resume: bool) -> None:
    """A new run needs a folder without checkpoints; ``resume`` needs one with them."""
    has_run = (work_dir / "last_checkpoint").is_file() or any(work_dir.glob("*.pth"))
    if has_run and not resume:
        raise RunFolderError(f"{work_dir} already holds a run (checkpoints); continue it with --resume, or give "
                             "another --work-dir (runs are never mixed in one folder)")
    if resume and not has_run:
        raise RunFolderError(f"{work_dir}: nothing to resume (no checkpoint there)")


def best_checkpoint(work_dir: str | Path) -> Path:
    """The best checkpoint of a run folder (a checkpoint file is returned as is).

    mmengine's CheckpointHook keeps exactly one ``best_*.pth`` per run and deletes the one it
    replaces, so more than one means two runs were mixed: that is an error, not a guess.
    Without a best checkpoint the run's last one (``last_checkpoint``) is used.
    """
    work_dir = Path(work_dir)
    if work_dir.is_file():
        return work_dir
    best = list(work_dir.glob("best_*.pth"))
    if len(best) > 1:
        raise RunFolderError(f"{work_dir}: several best checkpoints ({', '.join(sorted(p.name for p in best))}); "
                             "they come from different runs, so pass the checkpoint file itself")
    if best:
        return best[0]
    last = work_dir / "last_checkpoint"
    if last.is_file():
        return Path(last.read_text().strip())
    raise FileNotFoundError(f"{work_dir}: no checkpoint found")
