"""Assemble data, model and mmengine's Runner from a registry, and train."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from functools import partial
from pathlib import Path

import numpy as np
import torch
from mmengine.dataset import DefaultSampler
from mmengine.dist import barrier, get_dist_info, init_dist, is_distributed
from mmengine.evaluator import Evaluator
from mmengine.logging import MMLogger
from mmengine.runner import Runner
from torch.utils.data import DataLoader

from waterdrop import __version__
from waterdrop.config import ConfigError, RegistryConfig, load_registry
from waterdrop.data.dataset import (
    EvalTransform,
    MultiTaskDataset,
    TaskDataset,
    TrainTransform,
    collate,
    read_records,
    read_unlabeled,
)
from waterdrop.data.demo import ensure_demo_data
from waterdrop.data.sampler import (
    BalancedStream,
    MultiTaskBatchSampler,
    PlainStream,
    RepeatFactorStream,
    WithUnlabeled,
    repeat_factors,
    task_weights,
)
from waterdrop.engine.checkpoint import allow_mmengine_checkpoints, load_net, store_thresholds
from waterdrop.engine.hooks import WaterdropHook
from waterdrop.engine.metric import TaskMetric
from waterdrop.engine.model import WaterdropModel
from waterdrop.evaluation.evaluate import evaluate, format_report, thresholds_of
from waterdrop.model.multitask import MultiTaskNet


def build_datasets(cfg: RegistryConfig, net: MultiTaskNet, split: str) -> MultiTaskDataset:
    """One TaskDataset per task for ``split`` ("train" or "val"), labels checked by each head.
    Training sets of mean-teacher tasks also hold the unlabeled images and give two views."""
    datasets = []
    for t, task in enumerate(cfg.tasks):
        source = getattr(task, split)
        head = net.heads[task.name]
        known = [task.negative_label, *task.labels]
        records = read_records(source, known)
        boxes = head.encode_boxes if head.uses_boxes else None
        if split == "train":
            teaching = task.mean_teacher is not None
            unlabeled = read_unlabeled(task.unlabeled) if task.unlabeled else []
            datasets.append(TaskDataset(t, records, head.encode_target,
                                        TrainTransform(cfg.model.input_size, task.augment), source, unlabeled,
                                        second_view=teaching, encode_boxes=boxes))
        else:
            datasets.append(TaskDataset(t, records, head.encode_target, EvalTransform(cfg.model.input_size), source,
                                        encode_boxes=boxes))
    return MultiTaskDataset(datasets)


def task_streams(cfg: RegistryConfig, train_set: MultiTaskDataset, net: MultiTaskNet) -> list:
    """Per task, how its batch slots are filled (see ``waterdrop.data.sampler``)."""
    streams = []
    for task, dataset in zip(cfg.tasks, train_set.datasets):
        labeled = np.arange(dataset.labeled_count)
        if task.sampler.type == "balanced":
            if net.heads[task.name].kind != "binary":
                raise ConfigError(task.file, "sampler.type", "balanced needs a binary head (normal vs sub-classes)")
            classes = np.asarray(dataset.targets[:dataset.labeled_count], dtype=np.int64)
            labeled_stream = partial(BalancedStream, classes, task.sampler.normal_fraction)
        elif task.sampler.type == "repeat_factor":
            if net.heads[task.name].kind != "multilabel":
                raise ConfigError(task.file, "sampler.type", "repeat_factor needs a multi-label head")
            present = [[task.labels.index(n) for n in record.labels] for record in dataset.records[:len(labeled)]]
            factors = repeat_factors(present, len(task.labels), task.sampler.threshold, task.sampler.function)
            labeled_stream = partial(RepeatFactorStream, factors)
        else:
            labeled_stream = partial(PlainStream, labeled)
        if len(dataset) > dataset.labeled_count:
            fraction = task.mean_teacher.unlabeled_fraction
            unlabeled = np.arange(dataset.labeled_count, len(dataset))
            streams.append(lambda rng, make=labeled_stream, u=unlabeled, f=fraction: WithUnlabeled(make(rng=rng), u,
                                                                                                    f, rng))
        else:
            streams.append(lambda rng, make=labeled_stream: make(rng=rng))
    return streams


def val_loader(cfg: RegistryConfig, net: MultiTaskNet, distributed: bool = False) -> DataLoader:
    dataset = build_datasets(cfg, net, "val")
    sampler = DefaultSampler(dataset, shuffle=False) if distributed else None
    return DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.train.num_workers,
                      collate_fn=partial(collate, task_names=cfg.task_names))


def _log_details_to_file_only(logger: MMLogger) -> None:
    """mmengine logs ~180 lines of environment and config per run. The Runner is built at
    WARNING level to keep them off the console; from then on the log file gets INFO."""
    logger.setLevel(logging.INFO)
    for handler in logger.handlers:
        handler.setLevel(logging.INFO if isinstance(handler, logging.FileHandler) else logging.WARNING)


def build_runner(cfg: RegistryConfig, work_dir: str | Path, epochs: int | None = None, resume: bool = False,
                 launcher: str = "none", printer=print) -> Runner:
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    allow_mmengine_checkpoints()
    if launcher != "none" and not is_distributed():
        init_dist(launcher)
    rank, world_size = get_dist_info()
    train = cfg.train
    epochs = epochs or train.epochs
    torch.manual_seed(train.seed)
    model = WaterdropModel(cfg)
    train_set = build_datasets(cfg, model.net, "train")
    weights = task_weights(train.sampling_policy, train_set.sizes, cfg.task_names, train.sampling_weights)
    batch_sampler = MultiTaskBatchSampler(train_set.sizes, train.batch_size, weights, train.seed,
                                          task_streams(cfg, train_set, model.net), rank, world_size)
    train_loader = DataLoader(train_set, batch_sampler=batch_sampler, num_workers=train.num_workers,
                              collate_fn=partial(collate, task_names=cfg.task_names),
                              persistent_workers=train.num_workers > 0)
    amp = train.amp == "on" or (train.amp == "auto" and torch.cuda.is_available())
    optimizer = {"type": train.optimizer, "lr": train.lr, "weight_decay": train.weight_decay}
    if train.optimizer == "SGD":
        optimizer["momentum"] = train.momentum
    warmup = min(train.warmup_epochs, epochs)
    schedulers = []
    if warmup > 0:
        schedulers.append({"type": "LinearLR", "start_factor": 0.01, "by_epoch": True, "begin": 0, "end": warmup,
                           "convert_to_iter_based": True})
    if epochs > warmup:
        schedulers.append({"type": "CosineAnnealingLR", "by_epoch": True, "begin": warmup, "end": epochs,
                           "T_max": epochs - warmup, "eta_min": train.lr * 0.01, "convert_to_iter_based": True})
    hook = WaterdropHook(cfg.file, cfg.task_names, train.log_interval, printer)
    kinds = {name: head.kind for name, head in model.net.heads.items()}
    runner = Runner(
        model=model,
        work_dir=str(work_dir),
        train_dataloader=train_loader,
        val_dataloader=val_loader(cfg, model.net, world_size > 1),
        val_evaluator=Evaluator(TaskMetric(kinds)),
        train_cfg={"by_epoch": True, "max_epochs": epochs, "val_interval": 1},
        val_cfg={},
        optim_wrapper={"type": "AmpOptimWrapper" if amp else "OptimWrapper", "optimizer": optimizer,
                       "clip_grad": {"max_norm": 10.0}},
        param_scheduler=schedulers,
        default_hooks={
            "checkpoint": {"type": "CheckpointHook", "interval": 1, "save_best": "val/score", "rule": "greater",
                           "max_keep_ckpts": 2},
            "logger": {"type": "LoggerHook", "interval": train.log_interval},
        },
        custom_hooks=[hook],
        visualizer={"type": "Visualizer", "vis_backends": [{"type": "LocalVisBackend"},
                                                           {"type": "TensorboardVisBackend"}]},
        launcher=launcher,
        # Tasks absent from a batch leave their BN branches and heads without gradients.
        cfg={"model_wrapper_cfg": {"type": "MMDistributedDataParallel", "find_unused_parameters": True}},
        randomness={"seed": train.seed},
        resume=resume,
        log_level="WARNING",
    )
    _log_details_to_file_only(runner.logger)
    return runner


def best_checkpoint(work_dir: str | Path) -> Path:
    """The best checkpoint of a run, else its last one; a checkpoint file is returned as is."""
    work_dir = Path(work_dir)
    if work_dir.is_file():
        return work_dir
    best = sorted(work_dir.glob("best_*.pth"))
    if best:
        return best[-1]
    last = work_dir / "last_checkpoint"
    if last.is_file():
        return Path(last.read_text().strip())
    raise FileNotFoundError(f"{work_dir}: no checkpoint found")


def _record_run(cfg: RegistryConfig, work_dir: Path) -> None:
    """Copy the registry and task files and note the code version, so a run can be
    understood later."""
    config_dir = work_dir / "config"
    (config_dir / "tasks").mkdir(parents=True, exist_ok=True)
    shutil.copy(cfg.file, config_dir / cfg.file.name)
    for task in cfg.tasks:
        shutil.copy(task.file, config_dir / "tasks" / task.file.name)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    run = {"waterdrop_version": __version__, "git_commit": commit, "registry": str(cfg.file),
           "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    (work_dir / "run.json").write_text(json.dumps(run, indent=2))


def run_training(registry: str | Path, work_dir: str | Path, epochs: int | None = None, resume: bool = False,
                 launcher: str = "none", printer=print) -> dict | None:
    """Train all tasks of ``registry`` jointly, then evaluate the best checkpoint into
    ``work_dir/eval``. Returns the evaluation report (None on ranks other than 0)."""
    cfg = load_registry(registry)
    work_dir = Path(work_dir)
    if launcher != "none":
        init_dist(launcher)
    rank, _ = get_dist_info()
    if cfg.demo_data is not None and rank == 0 and ensure_demo_data(cfg.demo_data):
        printer(f"generated the demo data in {cfg.demo_data}")
    if is_distributed():
        barrier()
    runner = build_runner(cfg, work_dir, epochs, resume, launcher, printer)
    if rank == 0:
        _record_run(cfg, work_dir)
    runner.train()
    if rank != 0:
        return None
    checkpoint = best_checkpoint(work_dir)
    net, cfg, _ = load_net(checkpoint)
    report = evaluate(net, cfg, work_dir / "eval", "cuda" if torch.cuda.is_available() else "cpu")
    store_thresholds(checkpoint, thresholds_of(report))
    printer(f"evaluated {checkpoint.name}:\n{format_report(report)}")
    return report
