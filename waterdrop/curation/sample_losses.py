"""Train one task in a plain loop and record, at every epoch, each training sample's loss and
the probability the model gives its label: what O2U-Net ranks and loss-based outliers read.

mmengine's Runner is not used here: these runs see every labeled sample exactly once per
epoch in a fresh random order (the task's sampler may repeat or skip samples), set the
learning rate from a schedule of the caller's choosing at every iteration, and keep the
per-sample values by sample id, which a Runner's averaged logs would lose. Nothing of the
run is saved; the network passed in is trained in place.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader

from waterdrop.config import RegistryConfig
from waterdrop.data.dataset import collate, task_entries
from waterdrop.data.loaders import task_dataset
from waterdrop.kinds import kind_of
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.progress import Progress
from waterdrop.records import Record

#: Epochs done in the phase (fractional) -> learning rate of the heads.
LrSchedule = Callable[[float], float]


def constant(lr: float, warmup_epochs: float = 0.5) -> LrSchedule:
    """``lr`` after a linear warm-up from lr / 100 (as the training recipe starts)."""
    return lambda done: lr * min(1.0, 0.01 + 0.99 * done / warmup_epochs) if warmup_epochs > 0 else lr


def cyclic(lr_max: float, lr_min: float, cycle_epochs: float) -> LrSchedule:
    """High to low within each cycle, then back up (O2U-Net's cyclic schedule, per iteration)."""
    return lambda done: lr_max - (lr_max - lr_min) * ((done % cycle_epochs) / cycle_epochs)


@dataclass
class Phase:
    """``epochs`` epochs at the learning rate ``schedule`` gives (of epochs done in this phase)."""
    name: str
    epochs: int
    schedule: LrSchedule


@dataclass
class SampleLosses:
    """Per-sample records of a run, one row per epoch, one column per labeled training sample.

    ``losses``: the task's loss (sum of its own terms, its features' included) on the augmented view trained on;
    ``label_prob``: the probability the model gave the sample's own label (binary: of its
    class; multi-label: of the worst-fitting annotated tag); NaN where a sample was not seen
    (undecodable). ``phases`` names each row's phase and ``lrs`` gives its mid-epoch rate.
    """
    records: list[Record]
    losses: np.ndarray
    label_prob: np.ndarray
    phases: list[str]
    lrs: list[float]
    undecodable: list[str] = field(default_factory=list)
    skipped_batches: int = 0

    def rows_of(self, phase: str) -> np.ndarray:
        return np.array([i for i, name in enumerate(self.phases) if name == phase], dtype=np.int64)


def _optimizer(net: MultiTaskNet, cfg: RegistryConfig) -> tuple[torch.optim.Optimizer, list[float]]:
    """The registry's optimizer with the training's two groups: trunk at lr x trunk_lr_mult."""
    train = cfg.train
    trunk = {id(p) for backbone in net.backbones() for p in backbone.parameters()}
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in trunk]}, {"params": [p for p in params if id(p) not in trunk]}]
    multipliers = [train.trunk_lr_mult, 1.0]
    if train.optimizer == "SGD":
        optimizer = torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
    return optimizer, multipliers


def record_sample_losses(net: MultiTaskNet, cfg: RegistryConfig, task_name: str, phases: list[Phase],
                         device: str = "cpu", printer=print) -> SampleLosses:
    """Train ``net`` on task ``task_name``'s labeled training images through ``phases`` and
    record every sample's loss and label probability at every epoch.

    Undecodable images are left out and listed; a batch whose loss is not finite is not
    stepped on (counted in ``skipped_batches``) and its samples stay NaN for that epoch.
    """
    if task_name not in cfg.task_names:
        raise ValueError(f"no task '{task_name}' in {cfg.file}; tasks: {', '.join(cfg.task_names)}")
    t = cfg.task_names.index(task_name)
    head = net.heads[task_name]
    kind = kind_of(head.kind)
    kind.label_probability(np.zeros((1, 1)), np.zeros((1, 1)))  # refuses a kind it cannot rank, now
    dataset = task_dataset(cfg, net, t, "train", augment=True, substitute=False)
    count = dataset.labeled_count
    epochs = sum(p.epochs for p in phases)
    losses = np.full((epochs, count), np.nan, np.float32)
    label_prob = np.full((epochs, count), np.nan, np.float32)
    optimizer, multipliers = _optimizer(net, cfg)
    net.to(device).train()
    batch_size = cfg.train.batch_size
    steps = -(-count // batch_size)
    undecodable: set[str] = set()
    skipped_batches, row, names, lrs = 0, 0, [], []
    meter = Progress(f"{task_name}: recording losses", total=epochs * count)
    for phase in phases:
        for epoch in range(phase.epochs):
            seed = cfg.train.seed * 1000 + row
            random.seed(seed)
            torch.manual_seed(seed)
            order = np.random.default_rng(seed).permutation(count)
            loader = DataLoader(dataset, batch_sampler=[order[i:i + batch_size].tolist() for i in range(0, count,
                                                                                                       batch_size)],
                                num_workers=cfg.train.num_workers, generator=torch.Generator().manual_seed(seed),
                                collate_fn=partial(collate, task_names=cfg.task_names))
            for step, batch in enumerate(loader):
                undecodable.update(path for _, path in batch["skipped"])
                meter.update(len(batch["inputs"]) + len(batch["skipped"]), failed=len(batch["skipped"]))
                if task_name not in batch["targets"]:
                    continue
                lr = phase.schedule(epoch + step / steps)
                for group, multiplier in zip(optimizer.param_groups, multipliers):
                    group["lr"] = lr * multiplier
                images = batch["inputs"].to(device)
                target = batch["targets"][task_name].to(device)
                outputs = net.forward_tasks(images, batch["task_index"].to(device), complete=False)
                extras = {key: value.to(device) for key, value in task_entries(batch, task_name).items()}
                per_sample = sum(net.task_terms(task_name, outputs[task_name], target, extras=extras).values())
                loss = per_sample.mean()
                if not torch.isfinite(loss):
                    skipped_batches += 1
                    optimizer.zero_grad()
                    continue
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
                optimizer.step()
                ids = batch["ids"][task_name].numpy()
                losses[row, ids] = per_sample.detach().float().cpu().numpy()
                scores, truth = net.scores_and_truth({task_name: outputs[task_name]}, {task_name: target})[task_name]
                label_prob[row, ids] = kind.label_probability(scores, truth)
            names.append(phase.name)
            lrs.append(phase.schedule(epoch + 0.5))
            meter.clear()
            printer(f"{task_name}: {phase.name} epoch {epoch + 1}/{phase.epochs}: mean loss "
                    f"{np.nanmean(losses[row]):.4f}, lr {phase.schedule(epoch):.2e} -> "
                    f"{phase.schedule(epoch + (steps - 1) / steps):.2e}")
            row += 1
    meter.close()
    return SampleLosses(list(dataset.records[:count]), losses, label_prob, names, lrs, sorted(undecodable),
                        skipped_batches)
