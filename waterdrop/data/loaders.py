"""Datasets, samplers and loaders of a registry, for training, evaluation and the data tools.

``net`` is the ``MultiTaskNet`` whose heads encode the labels; it is passed in, never
imported, so this layer stays below the model and the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from mmengine.dataset import DefaultSampler
from torch.utils.data import DataLoader

from waterdrop.config import RegistryConfig
from waterdrop.data.dataset import (
    EvalTransform,
    MultiTaskDataset,
    TaskDataset,
    TrainTransform,
    collate,
)
from waterdrop.data.sampler import BalancedStream, PlainStream, RepeatFactorStream, WithUnlabeled, repeat_factors
from waterdrop.records import read_records, read_unlabeled

if TYPE_CHECKING:
    from waterdrop.model.multitask import MultiTaskNet


@dataclass
class DataNeeds:
    """What a task's features ask of its data (``TaskFeature.data_needs``).

    Attributes:
        second_view: training samples also carry a second, independently augmented view
            (batch key ``inputs2``).
        unlabeled: a folder or manifest of unlabeled images that join the training data,
            filling ``unlabeled_fraction`` of the task's batch slots (masked out of the
            supervised terms: batch key ``labeled``).
        view_size: training samples also carry the same crop at this input size when it is
            larger than the model's (batch key ``large_inputs``).
        boxes: encodes a sample's boxes, ``boxes(classes, xyxy_fractions) -> array`` with
            ``boxes.beyond_limit(classes)``, how many it leaves out, and ``boxes.left_out(count)``,
            the warning that says so (batch key ``boxes``).
    """

    second_view: bool = False
    unlabeled: Path | None = None
    unlabeled_fraction: float = 0.0
    view_size: int | None = None
    boxes: Callable | None = None


def network_needs(cfg: RegistryConfig, net: MultiTaskNet) -> dict[str, DataNeeds]:
    """Per task, what the features of ``net`` ask of its data (training features ask more:
    see ``WaterdropModel.data_needs``)."""
    needs = {task.name: DataNeeds() for task in cfg.tasks}
    for name, task_needs in needs.items():
        for feature in net.features.values():
            feature.data_needs(name, task_needs)
    return needs


def task_dataset(cfg: RegistryConfig, net: MultiTaskNet, t: int, split: str, augment: bool,
                 substitute: bool = True, needs: DataNeeds | None = None) -> TaskDataset:
    """The dataset of task ``t`` for ``split``, labels checked by its head.

    Args:
        augment: the task's training augmentations (else the runtime's plain resize).
        substitute: an undecodable image is replaced by the next readable one (else dropped;
            see ``TaskDataset``).
        needs: what its features read (None: those of ``net``); unlabeled images, second views
            and larger views come only with ``augment``.
    """
    task = cfg.tasks[t]
    source = getattr(task, split)
    head = net.heads[task.name]
    needs = needs or network_needs(cfg, net)[task.name]
    records = read_records(source, [task.negative_label, *task.labels])
    if augment:
        unlabeled = read_unlabeled(needs.unlabeled) if needs.unlabeled else []
        larger = needs.view_size if needs.view_size and needs.view_size > cfg.model.input_size else None
        transform = TrainTransform(larger or cfg.model.input_size, task.augment)
        dataset = TaskDataset(t, records, head.encode_target, transform, source, unlabeled,
                              second_view=needs.second_view, encode_boxes=needs.boxes, substitute=substitute,
                              student_size=cfg.model.input_size if larger else None)
    else:
        dataset = TaskDataset(t, records, head.encode_target, EvalTransform(cfg.model.input_size), source,
                              encode_boxes=needs.boxes, substitute=substitute)
    if needs.boxes is not None:  # boxes over the encoder's limit are not trained or scored; counted
        dataset.boxes_left_out = sum(needs.boxes.beyond_limit(classes) for classes, _ in dataset.boxes)
    return dataset


def build_datasets(cfg: RegistryConfig, net: MultiTaskNet, split: str,
                   needs: dict[str, DataNeeds] | None = None) -> MultiTaskDataset:
    """One TaskDataset per task for ``split`` ("train", "val" or "test"); tasks without a
    test split are left out of "test". ``needs``: per task, what its features read (None:
    those of ``net``)."""
    training = split == "train"
    needs = needs or network_needs(cfg, net)
    return MultiTaskDataset([task_dataset(cfg, net, t, split, augment=training, substitute=training,
                                          needs=needs[task.name])
                             for t, task in enumerate(cfg.tasks) if getattr(task, split) is not None])


def task_streams(cfg: RegistryConfig, train_set: MultiTaskDataset, needs: dict[str, DataNeeds]) -> list:
    """Per task, how its batch slots are filled (see ``waterdrop.data.sampler``); unlabeled
    images fill the fraction of the slots their feature asked for."""
    streams = []
    for task, dataset in zip(cfg.tasks, train_set.datasets):
        labeled = np.arange(dataset.labeled_count)
        # config checked that the sampler suits the task's kind
        if task.sampler.type == "balanced":
            classes = np.asarray(dataset.targets[:dataset.labeled_count], dtype=np.int64)
            labeled_stream = partial(BalancedStream, classes, task.sampler.normal_fraction)
        elif task.sampler.type == "repeat_factor":
            present = [[task.labels.index(n) for n in record.labels] for record in dataset.records[:len(labeled)]]
            factors = repeat_factors(present, len(task.labels), task.sampler.threshold, task.sampler.function)
            labeled_stream = partial(RepeatFactorStream, factors)
        else:
            labeled_stream = partial(PlainStream, labeled)
        if len(dataset) > dataset.labeled_count:
            fraction = needs[task.name].unlabeled_fraction
            unlabeled = np.arange(dataset.labeled_count, len(dataset))
            streams.append(lambda rng, make=labeled_stream, u=unlabeled, f=fraction: WithUnlabeled(make(rng=rng), u,
                                                                                                    f, rng))
        else:
            streams.append(lambda rng, make=labeled_stream: make(rng=rng))
    return streams


def eval_loader(cfg: RegistryConfig, net: MultiTaskNet, split: str = "val", distributed: bool = False) -> DataLoader:
    """Batches of every task's ``split`` ("val" or "test"), in a fixed order."""
    dataset = build_datasets(cfg, net, split)
    # No padding with repeated samples: with undecodable images dropped, mmengine's trim of the
    # gathered results would no longer remove exactly the repeats.
    sampler = DefaultSampler(dataset, shuffle=False, round_up=False) if distributed else None
    # Its own generator: starting an epoch of it must not draw from the training's random stream.
    return DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.train.num_workers,
                      collate_fn=partial(collate, task_names=cfg.task_names), generator=torch.Generator())
