"""Mean teacher (Tarvainen and Valpola, 2017): an EMA copy of the whole network (``teacher``)
sees a second view of a task's images, labeled and unlabeled; ``<task>.loss_consistency`` is
the MSE between student and teacher predictions, ramped up. The task's unlabeled images
(``data.unlabeled``) join its training data and are left out of the supervised terms.
Validation, evaluation and export use the teacher.

Settings (task YAML ``mean_teacher``, ``waterdrop.config.schema.MeanTeacherConfig``):
``ema_decay`` (the same for every task: there is one teacher), ``consistency_weight``,
``rampup_epochs`` and ``unlabeled_fraction`` of the task's batch slots.
"""

from __future__ import annotations

import copy
import math

import torch

from waterdrop.config import RegistryConfig
from waterdrop.features.base import LossBatch, TaskFeature, register_feature


def rampup(progress_epochs: float, rampup_epochs: float) -> float:
    """Sigmoid-shaped ramp from ~0 to 1 over ``rampup_epochs`` (Laine & Aila, 2017)."""
    if rampup_epochs <= 0:
        return 1.0
    t = min(max(progress_epochs / rampup_epochs, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


@register_feature
class MeanTeacher(TaskFeature):
    key = "mean_teacher"
    part_of_network = False

    def __init__(self, cfg: RegistryConfig, net):
        super().__init__(cfg, net)
        self.teacher = copy.deepcopy(net).requires_grad_(False)
        self.ema_decay = next(iter(self.settings.values())).ema_decay
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        self.unlabeled = {task.name: task.unlabeled for task in cfg.tasks}

    def renamed_state(self):
        return {"teacher.": "features.mean_teacher.teacher.", "ema_steps": "features.mean_teacher.ema_steps"}

    def deployed(self):
        return self.teacher

    def data_needs(self, task, needs):
        if task in self.settings:
            needs.second_view = True
            if self.unlabeled[task] is not None:
                needs.unlabeled, needs.unlabeled_fraction = self.unlabeled[task], self.settings[task].unlabeled_fraction

    def loss_terms(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        net = batch.net
        taught = [t for t, name in enumerate(net.task_names) if name in self.settings and name in batch.outputs]
        if not taught:
            return {}
        views = batch.extras.get("inputs2", batch.images)
        rows = torch.isin(batch.task_index, torch.tensor(taught, device=batch.task_index.device))
        with torch.no_grad():
            teacher_outputs = self.teacher.forward_tasks(views[rows], batch.task_index[rows], complete=False)
        losses = {}
        for t in taught:
            name = net.task_names[t]
            student = net.task_predictions(name, batch.outputs[name])
            teacher = self.teacher.task_predictions(name, teacher_outputs[name])
            mse = torch.stack([(student[k].float() - teacher[k].float()).pow(2).mean() for k in student]).mean()
            settings = self.settings[name]
            weight = settings.consistency_weight * rampup(batch.epoch_progress, settings.rampup_epochs)
            losses[f"{name}.loss_consistency"] = mse * weight * self.loss_weights[name]
        return losses

    @torch.no_grad()
    def after_step(self, student):
        """EMA of the student's weights; BatchNorm statistics are copied. The decay starts low so
        the teacher does not average in the random initialisation for long."""
        self.ema_steps += 1
        steps = int(self.ema_steps)
        decay = min(self.ema_decay, (1 + steps) / (10 + steps))
        for teacher, own in zip(self.teacher.parameters(), student.parameters()):
            teacher.lerp_(own.detach(), 1 - decay)
        for teacher, own in zip(self.teacher.buffers(), student.buffers()):
            teacher.copy_(own)
