"""Datasets, samplers and loaders of a registry, for training, evaluation and the data tools.

``net`` is the ``MultiTaskNet`` whose heads encode the labels; it is passed in, never
imported, so this layer stays below the model and the engine.
"""

from __future__ import annotations

from functools import partial
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


def task_dataset(cfg: RegistryConfig, net: MultiTaskNet, t: int, split: str, augment: bool,
                 substitute: bool = True, with_unlabeled: bool = True, teacher_size: int | None = None) -> TaskDataset:
    """The dataset of task ``t`` for ``split``, labels checked by its head.

    Args:
        augment: the task's training augmentations (else the runtime's plain resize).
        substitute: an undecodable image is replaced by the next readable one (else dropped;
            see ``TaskDataset``).
        with_unlabeled: a mean-teacher task's unlabeled images are appended, with two views.
        teacher_size: with ``augment``, a distillation teacher's input size; when larger than
            the model's, each sample also carries the teacher's view of the same crop.
    """
    task = cfg.tasks[t]
    source = getattr(task, split)
    head = net.heads[task.name]
    records = read_records(source, [task.negative_label, *task.labels])
    boxes = head.encode_boxes if head.uses_boxes else None
    if augment:
        teaching = with_unlabeled and task.mean_teacher is not None
        unlabeled = read_unlabeled(task.unlabeled) if teaching and task.unlabeled else []
        larger = teacher_size if teacher_size and teacher_size > cfg.model.input_size else None
        transform = TrainTransform(larger or cfg.model.input_size, task.augment)
        dataset = TaskDataset(t, records, head.encode_target, transform, source, unlabeled, second_view=teaching,
                              encode_boxes=boxes, substitute=substitute,
                              student_size=cfg.model.input_size if larger else None)
    else:
        dataset = TaskDataset(t, records, head.encode_target, EvalTransform(cfg.model.input_size), source,
                              encode_boxes=boxes, substitute=substitute)
    # Boxes over the head's limit are not trained or scored; counted so the run can say so.
    dataset.boxes_left_out = sum(head.boxes_beyond_limit(classes) for classes, _ in dataset.boxes)
    return dataset


def build_datasets(cfg: RegistryConfig, net: MultiTaskNet, split: str,
                   teacher_sizes: dict[str, int] | None = None) -> MultiTaskDataset:
    """One TaskDataset per task for ``split`` ("train", "val" or "test"); tasks without a
    test split are left out of "test". Training sets of mean-teacher tasks also hold the
    unlabeled images and give two views; a task distilled from a teacher of a larger input
    size (``teacher_sizes``: task name -> the teacher's size) gives the teacher's view too."""
    training = split == "train"
    teacher_sizes = teacher_sizes or {}
    return MultiTaskDataset([task_dataset(cfg, net, t, split, augment=training, substitute=training,
                                          teacher_size=teacher_sizes.get(task.name))
                             for t, task in enumerate(cfg.tasks) if getattr(task, split) is not None])


def task_streams(cfg: RegistryConfig, train_set: MultiTaskDataset, net: MultiTaskNet) -> list:
    """Per task, how its batch slots are filled (see ``waterdrop.data.sampler``)."""
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
            fraction = task.mean_teacher.unlabeled_fraction
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
