"""Loading checkpoints with ``weights_only=True``.

mmengine checkpoints also hold its message hub (HistoryBuffer) and a few numpy objects,
which torch's weights-only unpickler refuses; exactly those are allow-listed, nothing more.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

from waterdrop.config import RegistryConfig, config_from_dict, config_to_dict, load_registry
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
    """Rebuild the network of a training checkpoint from the config stored in it (labels,
    heads, relations, preprocessing as they were trained), not from today's YAML files.

    ``registry`` points the same tasks at other data: only the tasks' data paths are read
    from it, and its tasks must match the checkpoint's (names, labels in order, heads).
    """
    checkpoint = load_checkpoint(checkpoint_path)
    meta = checkpoint.get("meta", {}).get("waterdrop", {})
    if "config" not in meta:
        raise ValueError(f"{checkpoint_path}: no config recorded in it (a checkpoint of waterdrop before 0.1.0's "
                         "config snapshots, or not a waterdrop checkpoint); retrain it")
    cfg = config_from_dict(meta["config"])
    if registry is not None:
        cfg = _with_data_of(cfg, load_registry(registry), checkpoint_path, registry)
    # The checkpoint holds every weight: the pretrained files need not exist any more.
    fusion = cfg.model.fusion and dataclasses.replace(cfg.model.fusion, pretrained=None)
    net = MultiTaskNet(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None, fusion=fusion)))
    # The checkpoint may hold more than one network (a mean teacher's beside the student): the
    # deployed one is named in it. Older checkpoints kept a mean teacher under "teacher.".
    prefix = meta.get("deployed") or ("teacher." if any(k.startswith("teacher.") for k in checkpoint["state_dict"])
                                      else "net.")
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state)
    return net.eval(), cfg, meta


def _with_data_of(trained: RegistryConfig, other: RegistryConfig, checkpoint_path, registry) -> RegistryConfig:
    def identity(task):
        return task.name, task.labels, task.head_type, task.head_args

    if [identity(t) for t in trained.tasks] != [identity(t) for t in other.tasks]:
        raise ValueError(f"{checkpoint_path} was trained on tasks {trained.task_names} (labels in order, heads); "
                         f"{registry} differs, so it cannot supply their data")
    tasks = [dataclasses.replace(t, train=o.train, val=o.val, test=o.test, unlabeled=o.unlabeled)
             for t, o in zip(trained.tasks, other.tasks)]
    return dataclasses.replace(trained, tasks=tasks)


def last_checkpoint(work_dir: Path) -> Path | None:
    """The checkpoint mmengine saved last in a run folder (its ``last_checkpoint`` record). The
    record holds an absolute path: in a folder moved or copied since, the file of that name here."""
    record = Path(work_dir) / "last_checkpoint"
    if not record.is_file():
        return None
    recorded = Path(record.read_text().strip())
    here = Path(work_dir) / recorded.name
    return here if here.is_file() else recorded


def check_resumable(work_dir: Path, cfg: RegistryConfig) -> None:
    """A resumed run must have the config its checkpoints were trained with."""
    last = last_checkpoint(work_dir)
    if last is None:
        return
    recorded = load_checkpoint(last).get("meta", {}).get("waterdrop", {}).get("config")
    if recorded is None:
        return
    # Read back first: a key added to waterdrop since the run started takes its default there.
    recorded = config_to_dict(config_from_dict(recorded))
    current = config_to_dict(cfg)
    if recorded == current:
        return
    changed = first_difference(recorded, current)
    raise RunFolderError(f"{work_dir}: the config changed since this run started (first difference: {changed}); "
                         "resume with the same registry and task files, or start a new --work-dir")


def first_difference(old, new, where: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return first_difference(a, b, f"{where}[{i}]")
    return f"{where}: {old!r} -> {new!r}"


def recorded_thresholds(checkpoint_path: str | Path, meta: dict) -> tuple[dict | None, str | None]:
    """The thresholds chosen for a checkpoint and where they were found: ``eval/thresholds.json``
    beside it (training and tools/eval.py write it; the checkpoint itself is never rewritten),
    else the checkpoint's own record (runs of earlier versions); (None, None) when neither."""
    beside = Path(checkpoint_path).parent / "eval" / "thresholds.json"
    if beside.is_file():
        record = beside.with_name("evaluated.json")
        chosen_for = json.loads(record.read_text())["checkpoint"] if record.is_file() else None
        if chosen_for and Path(chosen_for).name != Path(checkpoint_path).name:
            raise ValueError(f"{beside} holds the thresholds chosen for {Path(chosen_for).name}, not for "
                             f"{Path(checkpoint_path).name}; evaluate it (tools/eval.py {checkpoint_path}) and "
                             "pass that evaluation's thresholds.json with --thresholds")
        return json.loads(beside.read_text()), str(beside)
    if "thresholds" in meta:
        return meta["thresholds"], f"{checkpoint_path} (recorded there by an earlier version)"
    return None, None


class RunFolderError(ValueError):
    """A run folder holds something that would mix two runs."""


def check_run_folder(work_dir: Path, resume: bool, checkpoint_bytes: int = 0) -> None:
    """Before any training: the folder must be writable with room for the checkpoints, a
    new run needs a folder without checkpoints, and ``resume`` needs one with them."""
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        probe = work_dir / f".write_probe_{os.getpid()}"  # one per rank under DDP
        probe.write_bytes(b"waterdrop")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"{work_dir}: cannot write the run folder there ({err.strerror or err})") from err
    # Best, last and the one being written, plus room for logs and plots.
    needed = 3 * checkpoint_bytes + 50 * 2**20
    free = shutil.disk_usage(work_dir).free
    if free < needed:
        raise RunFolderError(f"{work_dir}: {free / 2**20:.0f} MiB free on that disk, a run needs about "
                             f"{needed / 2**20:.0f} MiB for its checkpoints")
    has_run = last_checkpoint(work_dir) is not None or any(work_dir.glob("*.pth"))
    if has_run and not resume:
        raise RunFolderError(f"{work_dir} already holds a run (checkpoints); continue it with --resume, or give "
                             "another --work-dir (runs are never mixed in one folder)")
    if resume and not has_run:
        raise RunFolderError(f"{work_dir}: nothing to resume (no checkpoint there)")


def best_checkpoint(work_dir: str | Path) -> Path:
    """The kept checkpoint of a run folder: its val-picked ``best_*.pth``, else the last one (a checkpoint
    file is returned as is).

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
    chosen = best[0] if best else last_checkpoint(work_dir)
    if chosen is None:
        raise FileNotFoundError(f"{work_dir}: no checkpoint found")
    return chosen
